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


# -- routing keys: a typo in `when:` routes nothing, so `check` says which key it meant ---------------
ROUTED = """
    channels:
      adt-in:
        source: {type: mllp, port: 0}
        routes:
          - name: r
            when: WHEN
            to: {type: test_collect, name: x}
      ct-in:
        source: {type: dicom, port: 0, calling_aets: [CT01]}
        routes:
          - name: d
            when: DWHEN
            to: {type: test_collect, name: x}
      api:
        source: {type: fhir, port: 0, auth: {open: true}}
        routes:
          - name: f
            when: FWHEN
            to: {type: test_collect, name: x}
"""


def routed(when="{}", dwhen="{}", fwhen="{}"):
    return parse(ROUTED.replace("DWHEN", dwhen).replace("FWHEN", fwhen).replace("WHEN", when))


def routing_problems(**kw):
    with pytest.raises(ConfigError) as e:
        routed(**kw)
    assert e.value.exit_code == 3, [str(p) for p in e.value.problems]
    return [str(p) for p in e.value.problems]


def test_known_routing_keys_of_each_kind_pass():
    s = routed(when='{"MSH-9.1": ADT, "PID-3.1": "1*", "OBX[2]-5": x, "ZPI-1": y, "PV1-19": {exists: true}}',
               dwhen="{Modality: CT, CallingAETitle: CT01, SOPClassUID: '1.2*'}",
               fwhen='{resourceType: Patient, gender: female, "name.family": DOE, interaction: create}')
    assert s.channels["adt-in"].routes[0].when["MSH-9.1"] == "ADT"


def test_unknown_hl7_segment_names_the_closest_key():
    msgs = routing_problems(when='{"MHS-9.1": ADT}')
    assert msgs == ["channels.yaml:7: channels.adt-in.routes[0].when.MHS-9.1: unknown routing key 'MHS-9.1': "
                    "MHS is not an HL7 v2 segment (did you mean MSH-9.1?)"]


def test_hl7_key_that_is_no_position_suggests_one():
    msgs = routing_problems(when='{"msh.9.1": ADT}')
    assert "HL7 v2 keys are field positions" in msgs[0] and "(did you mean MSH-9.1?)" in msgs[0]


def test_hl7_field_the_segment_does_not_have():
    msgs = routing_problems(when='{"PID-300": x}')
    assert "unknown routing key 'PID-300'" in msgs[0] and "PID has" in msgs[0]


def test_unknown_dicom_keyword_names_the_closest_keyword():
    msgs = routing_problems(dwhen="{Modalty: [CT, MR]}")
    assert msgs == ["channels.yaml:13: channels.ct-in.routes[0].when.Modalty: unknown routing key 'Modalty': "
                    "not a DICOM keyword nor a header of DICOM messages (did you mean Modality?)"]
    assert "use its keyword Modality" in routing_problems(dwhen='{"(0008,0060)": CT}')[0]


def test_unknown_fhir_element_and_resource_type():
    msgs = routing_problems(fwhen="{resourceType: Patient, gendr: female}")
    assert msgs[0].endswith("gendr is not an element of Patient nor a header of FHIR messages (did you mean gender?)")
    msgs = routing_problems(fwhen='{resourceType: Patient, "name.famly": DOE}')
    assert msgs[0].endswith("name has no element famly (did you mean family?)")
    msgs = routing_problems(fwhen="{resourceType: Patinet}")
    assert msgs[0].endswith("'Patinet' is not a FHIR R4 resource type (did you mean Patient?)")


def test_keys_inside_any_all_not_and_debounce_are_checked():
    msgs = routing_problems(when='{any: [{"MSH-9.1": ADT}, {"PDI-3": x}], not: {"MSH-4": LAB}}')
    assert msgs == ["channels.yaml:7: channels.adt-in.routes[0].when.any[1].PDI-3: unknown routing key 'PDI-3': "
                    "PDI is not an HL7 v2 segment (did you mean PID-3?)"]
    with pytest.raises(ConfigError) as e:
        debounced = "          - name: d\n            debounce: {key: StudyInstanceUid, seconds: 1}\n"
        parse(ROUTED.replace("DWHEN", "{}").replace("FWHEN", "{}").replace("WHEN", "{}").replace(
            "          - name: d\n", debounced))
    assert e.value.exit_code == 3
    assert "channels.ct-in.routes[0].debounce.key: unknown routing key 'StudyInstanceUid'" in str(e.value)
    assert "(did you mean StudyInstanceUID?)" in str(e.value)


def test_routing_keys_of_other_sources_are_not_judged():
    parse("""
        channels:
          a:
            source: {type: test_null}
            routes:
              - {name: r, when: {anything: goes}, to: {type: test_collect, name: x}}
    """)


# -- secrets: ${file:} and ${generated:} -------------------------------------------------------
def test_file_secret_is_read(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    s = parse_settings(textwrap.dedent("""
        store: {url: "postgresql+psycopg://u:${file:pw}@h/db"}
        channels: {}
    """), tmp_path / "channels.yaml", env={})
    assert s.store.url == "postgresql+psycopg://u:s3cret@h/db"  # was left as the literal "${file:pw}"


def test_missing_file_secret_is_an_environment_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_settings(textwrap.dedent("""
            channels:
              api:
                source: {type: fhir, port: 0, auth: {bearer_tokens: ["${file:nope}"]}}
        """), tmp_path / "channels.yaml", env={})
    assert e.value.exit_code == 4 and len(e.value.problems) == 1
    assert "cannot read secret file" in str(e.value) and "empty token" not in str(e.value)


def test_unset_variable_is_exit_4_even_where_a_validator_sees_it_empty():
    """`${MEDRELAY_API_TOKEN}` unset made auth say "empty token" too, and that schema problem won: exit 2."""
    with pytest.raises(ConfigError) as e:
        parse("""
            channels:
              api:
                source: {type: fhir, port: 0, auth: {bearer_tokens: ["${NO_TOKEN_HERE}"]}}
        """)
    assert e.value.exit_code == 4, [str(p) for p in e.value.problems]
    assert [p.phase for p in e.value.problems] == ["environment"]


GENERATED = """
    channels:
      api:
        source: {type: fhir, port: 0, auth: {bearer_tokens: ["${generated:data/api-token}"]}}
"""


def test_generated_secret_is_created_only_by_the_engine(tmp_path):
    cfg = tmp_path / "channels.yaml"
    s = parse_settings(textwrap.dedent(GENERATED), cfg, env={})  # check, test, offline commands
    token = tmp_path / "data" / "api-token"
    assert not token.exists() and s.pending_secrets == [token.resolve()]
    placeholder = s.channels["api"].source.auth.bearer_tokens[0]  # validates; random, never a default
    assert placeholder.startswith("<generated-on-first-run:") and len(placeholder) > 40
    s = parse_settings(textwrap.dedent(GENERATED), cfg, env={}, create_secrets=True)
    assert token.exists() and oct(token.stat().st_mode & 0o777) == "0o600"
    value = token.read_text().strip()
    assert len(value) >= 32 and s.channels["api"].source.auth.bearer_tokens == [value]
    assert s.generated_secrets == {token.resolve(): True}
    again = parse_settings(textwrap.dedent(GENERATED), cfg, env={}, create_secrets=True)
    assert again.channels["api"].source.auth.bearer_tokens == [value]  # kept, not replaced
    assert again.generated_secrets == {token.resolve(): False}


def test_generated_secret_written_by_the_operator_is_used(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "api-token").write_text("chosen-by-the-site-0123456789\n")
    s = parse_settings(textwrap.dedent(GENERATED), tmp_path / "channels.yaml", env={}, create_secrets=True)
    assert s.channels["api"].source.auth.bearer_tokens == ["chosen-by-the-site-0123456789"]


def test_generated_secret_two_engines_at_once_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from engine.config import generate_secret

    target = tmp_path / "d" / "tok"
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: generate_secret(target), range(8)))
    assert made.count(True) == 1 and len(target.read_text().strip()) >= 32
    assert sorted(p.name for p in target.parent.iterdir()) == ["tok"]  # no temporary file left
