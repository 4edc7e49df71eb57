import textwrap
from pathlib import Path

import engine_fakes  # noqa: F401  (registers test components)
import pytest

from engine.config import ConfigError, parse_settings


def parse(text: str, env=None):
    return parse_settings(textwrap.dedent(text), Path("channels.yaml"), env=env or {})


def test_valid_minimal():
    s = parse("""
        channels:
          a:
            source: {type: test_null}
            routes:
              - name: r1
                when: {"MSH-9.1": [ADT, ORU]}
                to: {type: test_collect, name: x}
    """)
    assert s.channels["a"].routes[0].when == {"MSH-9.1": ["ADT", "ORU"]}
    assert len(s.config_hash) == 64


def test_error_has_line_and_dotted_path():
    with pytest.raises(ConfigError) as e:
        parse("""
            channels:
              adt-in:
                source: {type: test_null}
                routes:
                  - name: ok
                    to: {type: test_collect, name: x}
                  - name: bad
                    to:
                      type: test_collect
                      name: x
                      port: "abc"
        """)
    msgs = [str(p) for p in e.value.problems]
    assert any(m.startswith("channels.yaml:12: channels.adt-in.routes[1].to.port:") for m in msgs), msgs
    assert e.value.exit_code == 2


def test_unknown_type_and_extra_key_rejected():
    with pytest.raises(ConfigError) as e:
        parse("""
            channels:
              a:
                source: {type: nosuch}
                routes: []
                extra_key: 1
        """)
    paths = {p.path for p in e.value.problems}
    assert "channels.a.source" in paths or any(p.startswith("channels.a.source") for p in paths)
    assert "channels.a.extra_key" in paths


def test_env_interpolation_and_default():
    s = parse("""
        store: {url: "${DB_URL:-sqlite:///x.db}", blobs: "${BLOBS}"}
        channels: {}
    """, env={"BLOBS": "/tmp/b"})
    assert s.store.url == "sqlite:///x.db"
    assert s.store.blobs == "/tmp/b"


def test_missing_env_is_environment_problem():
    with pytest.raises(ConfigError) as e:
        parse("""
            store: {blobs: "${NOPE}"}
            channels: {}
        """)
    assert e.value.problems[0].phase == "environment"
    assert "NOPE" in e.value.problems[0].message
    assert e.value.problems[0].line == 2
    assert e.value.exit_code == 4


def test_duplicate_route_names_is_topology_problem():
    with pytest.raises(ConfigError) as e:
        parse("""
            channels:
              a:
                source: {type: test_null}
                routes:
                  - {name: r, to: {type: test_collect, name: x}}
                  - {name: r, to: {type: test_collect, name: y}}
        """)
    assert e.value.exit_code == 3
    assert e.value.problems[0].path == "channels.a.routes[1].name"


def test_yaml_syntax_error_has_line():
    with pytest.raises(ConfigError) as e:
        parse("channels:\n  a: [unclosed\n")
    assert e.value.problems[0].line is not None
    assert e.value.exit_code == 2
