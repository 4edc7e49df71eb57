"""Names and ports one part of channels.yaml gives another are checked (probe session 6, 1/4/6).

- an `hl7_app_ack.after` route that does not exist (or is the route itself) answered AA at once;
- a `dicom_prefetch.channel` that is no DICOM channel failed only at `run`;
- an `alerts.routes` key naming no route silently applied to nothing;
- `metrics`/`console` on a channel's port passed `check`, and `run` blamed the channel;
- a duplicate YAML key printed both values (a store URL with its password).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.config import ConfigError, Problem, parse_settings


def problems(text: str) -> tuple[list[str], int]:
    with pytest.raises(ConfigError) as e:
        parse_settings(textwrap.dedent(text), Path("channels.yaml"), env={"T": "secret-token-123"})
    return [str(p) for p in e.value.problems], e.value.exit_code


APP_ACK = """
channels:
  adt-in:
    source: {{type: mllp, port: 0}}
    routes:
      - name: to-ris
        to: {{type: mllp, host: 127.0.0.1, port: 9}}
      - name: app-ack
        to:
          type: hl7_app_ack
          host: 127.0.0.1
          port: 9
          after:
            - {after}
"""


def test_app_ack_after_unknown_route():
    msgs, code = problems(APP_ACK.format(after="to-riss"))
    assert code == 3
    assert msgs == [
        "channels.yaml:14: channels.adt-in.routes[1].to.after[0]: no route 'to-riss' in channel "
        "adt-in (did you mean 'to-ris'?)"
    ], msgs


def test_app_ack_after_itself():
    msgs, code = problems(APP_ACK.format(after="app-ack"))
    assert code == 3
    assert msgs == ["channels.yaml:14: channels.adt-in.routes[1].to.after[0]: route 'app-ack' names itself"], msgs


def test_app_ack_after_existing_route_is_fine():
    s = parse_settings(textwrap.dedent(APP_ACK.format(after="to-ris")), Path("channels.yaml"), env={})
    assert s.channels["adt-in"].routes[1].to.after == ["to-ris"]


PREFETCH = """
channels:
  dcm:
    source: {{type: dicom, port: 0, calling_aets: [PACS2]}}
  orders:
    source: {{type: mllp, port: 0}}
    routes:
      - name: prefetch
        to:
          sources: [{{ae_title: PACS2, host: 127.0.0.1, port: 9, retrieve: get}}]
          type: dicom_prefetch
          channel: {channel}
"""


@pytest.mark.parametrize("channel", ["dcmm", "orders"])
def test_prefetch_channel_must_be_a_dicom_channel(channel):
    msgs, code = problems(PREFETCH.format(channel=channel))
    assert code == 3
    assert len(msgs) == 1 and msgs[0].startswith(
        f"channels.yaml:12: channels.orders.routes[0].to.channel: no DICOM channel '{channel}'"
    ), msgs


ALERTS = """
alerts:
  routes:
    adt-in/to-ris: {{}}
    {key}: {{dead_letters: 5}}
channels:
  adt-in:
    source: {{type: mllp, port: 0}}
    routes:
      - {{name: to-ris, to: {{type: mllp, host: 127.0.0.1, port: 9}}}}
"""


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("adt-in/to-riss", "no route 'to-riss' in channel adt-in (did you mean 'to-ris'?)"),
        ("adt/to-ris", "no channel 'adt' (did you mean 'adt-in'?) (keys are `channel/route`)"),
        ("to-ris", "no channel 'to-ris' (keys are `channel/route`)"),
    ],
)
def test_alert_route_keys_name_routes(key, message):
    msgs, code = problems(ALERTS.format(key=key))
    assert code == 3
    assert msgs == [f"channels.yaml:5: alerts.routes.{key}: {message}"], msgs


PORTS = """
metrics: {{host: {mhost}, port: {mport}}}
console: {{host: {chost}, port: {cport}}}
channels:
  api:
    source: {{type: fhir, host: {fhost}, port: {fport}, auth: {{open: true}}}}
  adt-in:
    source: {{type: mllp, host: 127.0.0.1, port: {lport}}}
"""


def ports(**kw: object) -> str:
    base = {
        "mhost": "127.0.0.1",
        "mport": 9464,
        "chost": "127.0.0.1",
        "cport": 8090,
        "fhost": "127.0.0.1",
        "fport": 8080,
        "lport": 2575,
    }
    return PORTS.format(**{**base, **kw})


def test_metrics_port_of_a_channel():
    msgs, code = problems(ports(mport=8080))
    assert code == 3
    assert msgs == [
        "channels.yaml:2: metrics.port: port 8080 on 127.0.0.1 is also used by channel 'api' (on 127.0.0.1)"
    ], msgs


def test_console_port_of_metrics_and_wildcard_host():
    msgs, _ = problems(ports(cport=9464, chost="0.0.0.0"))
    assert msgs == ["channels.yaml:3: console.port: port 9464 on 0.0.0.0 is also used by metrics (on 127.0.0.1)"], msgs
    msgs, _ = problems(ports(fhost="'::'", lport=8080))
    assert msgs == [
        "channels.yaml:8: channels.adt-in.source.port: port 8080 on 127.0.0.1 is also used by channel 'api' (on ::)"
    ], msgs


def test_no_clash_on_other_hosts_or_port_zero():
    parse_settings(textwrap.dedent(ports(mport=8080, mhost="10.0.0.1")), Path("c.yaml"), env={})
    parse_settings(textwrap.dedent(ports(mport=0, cport=0, fport=0, lport=0)), Path("c.yaml"), env={})


DUP = """\
store:
  url: "sqlite:///x.db"
channels: {}
store:
  url: "postgresql+psycopg://medrelay_dev:devpass123@127.0.0.1:5432/db"
"""


def test_duplicate_key_prints_no_values(tmp_path):
    """`medrelay check` on a duplicate `store:`: the key and both lines, no URL, no password."""
    cfg = tmp_path / "dup.yaml"
    cfg.write_text(DUP)
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "check", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f'{cfg}:4: YAML: found duplicate key "store" (first at line 1)', r.stderr
    assert "devpass123" not in r.stdout + r.stderr and "sqlite" not in r.stderr


def test_duplicate_channel_prints_no_token():
    msgs, _ = problems("""
        channels:
          api:
            source: {type: fhir, port: 0, auth: {bearer_tokens: ["${T}"]}}
          api:
            source: {type: fhir, port: 0, auth: {bearer_tokens: ["literal-token-abc"]}}
    """)
    assert msgs == ['channels.yaml:5: YAML: found duplicate key "api" (first at line 3)'], msgs


def test_nested_duplicate_key_prints_no_password():
    msgs, _ = problems("""
        store:
          url: "sqlite:///x.db"
          url: "postgresql+psycopg://u:pw-dup-1@db/x"
        channels:
          a:
            source: {type: mllp, port: 0}
            routes:
              - name: r
                to: {type: mllp, host: 127.0.0.1, port: 9}
                name: r2
    """)
    assert msgs == ['channels.yaml:4: YAML: found duplicate key "url" (first at line 3)'], msgs
    msgs, _ = problems("""
        channels:
          a:
            source: {type: mllp, port: 0}
            routes:
              - name: r
                to: {type: mllp, host: 127.0.0.1, port: 9}
                name: r2
    """)
    assert msgs == ['channels.yaml:8: YAML: found duplicate key "name" (first at line 6)'], msgs


def test_messages_are_scrubbed_of_secret_values():
    """A validator quoting a secret-bearing value (or any URL's password) is masked."""
    from engine.config import _scrubbed

    data = {
        "store": {"url": "postgresql+psycopg://u:pw-9x@db/x"},
        "alerts": {"webhook": {"url": "https://hooks/abc", "headers": {"Authorization": "Bearer tok-77"}}},
    }
    out = _scrubbed(
        [
            Problem("c.yaml", 2, "store.url", "bad URL 'postgresql+psycopg://u:pw-9x@db/x'", "schema"),
            Problem("c.yaml", 3, "alerts.webhook", "header 'Bearer tok-77' refused", "schema"),
            Problem("c.yaml", 4, "x", "cannot reach ldap://admin:hunter2@ldap/ (elsewhere)", "schema"),
        ],
        data,
    )
    text = "\n".join(str(p) for p in out)
    for secret in ("pw-9x", "tok-77", "hunter2"):
        assert secret not in text, text
    assert "ldap://admin:***@ldap/" in text
