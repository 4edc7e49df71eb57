"""The condition language: every operator, combinators, and the same syntax in route `when:` and `filter`."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest
from conftest import delivered_files
from mllp_peers import adt

from engine.envelope import Drop, Envelope
from engine.mapping.conditions import MISSING, compile_condition, to_datetime
from engine.match import matches
from transforms.filter import FilterConfig
from transforms.filter import build as build_filter


def check(spec, values) -> bool:
    return compile_condition(spec).test(lambda k: values.get(k, MISSING))


@pytest.mark.parametrize("spec,values,expect", [
    # what `when:` always did
    ({"A": "x"}, {"A": "x"}, True),
    ({"A": "x"}, {"A": "y"}, False),
    ({"A": ["x", "y"]}, {"A": "y"}, True),
    ({"A": "O*"}, {"A": "ORU"}, True),
    ({"A": "x", "B": "y"}, {"A": "x", "B": "z"}, False),
    ({"A": 5}, {"A": "5"}, True),
    ({"A": "x"}, {}, False),
    ({"A": "x"}, {"A": ["y", "x"]}, True),  # several values: any
    # in / not / eq
    ({"A": {"in": ["F", "U"]}}, {"A": "U"}, True),
    ({"A": {"in": ["F", "U"]}}, {"A": "M"}, False),
    ({"A": {"not": "E"}}, {"A": "I"}, True),
    ({"A": {"not": "E"}}, {"A": "E"}, False),
    ({"A": {"not": "E"}}, {}, True),
    ({"A": {"not": {"in": ["E", "I"]}}}, {"A": "O"}, True),
    ({"A": {"not": "E"}}, {"A": ["I", "E"]}, False),  # "no value is E"
    ({"A": {"eq": "O*"}}, {"A": "ORU"}, False),  # eq: no wildcards
    ({"A": {"eq": "O*"}}, {"A": "O*"}, True),
    # regex
    ({"A": {"regex": "^LAB"}}, {"A": "LAB2"}, True),
    ({"A": {"regex": "^LAB"}}, {"A": "XLAB"}, False),
    ({"A": {"regex": r"^\d+$"}}, {"A": ["x", "12"]}, True),
    # exists / missing
    ({"A": {"exists": True}}, {"A": "x"}, True),
    ({"A": {"exists": True}}, {"A": ""}, False),
    ({"A": {"exists": True}}, {}, False),
    ({"A": {"exists": False}}, {}, True),
    ({"A": {"missing": True}}, {"A": ""}, True),
    ({"A": {"missing": True}}, {"A": "x"}, False),
    # numbers
    ({"A": {"gt": 10}}, {"A": "10.5"}, True),
    ({"A": {"gt": 10}}, {"A": "10"}, False),
    ({"A": {"ge": 10}}, {"A": "10"}, True),
    ({"A": {"lt": 0}}, {"A": "-1"}, True),
    ({"A": {"le": 3.5}}, {"A": 3.5}, True),
    ({"A": {"gt": 1, "lt": 5}}, {"A": "3"}, True),
    ({"A": {"gt": 1, "lt": 5}}, {"A": "7"}, False),
    ({"A": {"gt": 1}}, {"A": "<3"}, False),  # not a number: fails
    ({"A": {"gt": 100}}, {"A": ["5", "500"]}, True),
    # dates: HL7 compact, DICOM DA, ISO, YAML dates
    ({"A": {"before": "2000-01-01"}}, {"A": "19991231235959"}, True),
    ({"A": {"before": "20000101"}}, {"A": "2000-01-01"}, False),
    ({"A": {"after": date(2020, 5, 1)}}, {"A": "20200502"}, True),
    ({"A": {"after": "2020-05-01T10:00"}}, {"A": "202005011001+0200"}, True),
    ({"A": {"after": "2020-05-01"}}, {"A": "not a date"}, False),
    # combinators
    ({"any": [{"A": "x"}, {"B": "y"}]}, {"B": "y"}, True),
    ({"any": [{"A": "x"}, {"B": "y"}]}, {"B": "n"}, False),
    ({"all": [{"A": "x"}, {"B": "y"}]}, {"A": "x", "B": "y"}, True),
    ({"all": [{"A": "x"}, {"B": "y"}]}, {"A": "x"}, False),
    ({"not": {"A": "x"}}, {"A": "y"}, True),
    ({"A": "x", "any": [{"B": {"gt": 1}}, {"C": {"exists": True}}]}, {"A": "x", "C": "1"}, True),
])
def test_operators(spec, values, expect):
    assert check(spec, values) is expect


def test_relative_dates_are_evaluated_at_test_time():
    adult = (datetime.now() - timedelta(days=365 * 30)).strftime("%Y%m%d")
    child = (datetime.now() - timedelta(days=365 * 5)).strftime("%Y%m%d")
    minor = {"PID-7": {"after": "-18y"}}
    assert check(minor, {"PID-7": child}) and not check(minor, {"PID-7": adult})
    assert check({"T": {"before": "now"}}, {"T": "20000101"})
    assert check({"T": {"after": "-30d"}}, {"T": datetime.now().strftime("%Y%m%d%H%M")})
    assert not check({"T": {"after": "+1h"}}, {"T": datetime.now().strftime("%Y%m%d%H%M")})


def test_date_parsing():
    assert to_datetime("20240229") == datetime(2024, 2, 29)
    assert to_datetime("202402291530") == datetime(2024, 2, 29, 15, 30)
    assert to_datetime("2024-02-29T15:30:10Z") == datetime(2024, 2, 29, 15, 30, 10)
    assert to_datetime("20240230") is None


@pytest.mark.parametrize("spec,message", [
    ({"A": {"gt": "ten"}}, "A: gt: takes a number"),
    ({"A": {"before": "someday"}}, "A: not a date"),
    ({"A": {"regex": "("}}, "A: regex"),
    ({"A": {"frobnicate": 1}}, "A: unknown operator 'frobnicate'"),
    ({"A": {"exists": "yes"}}, "A: exists: takes true or false"),
    ({"A": None}, "A: a condition value cannot be null"),
    ({"A": []}, "A: an empty list"),
    ({"any": {"A": 1}}, "any: takes a non-empty list"),
    ({"A": {"in": "x"}}, "A: in: takes a non-empty list"),
])
def test_bad_conditions_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError) as e:
        compile_condition(spec)
    assert str(e.value).startswith(message)


# -- route when: ------------------------------------------------------------------------------
def env(payload: bytes, **headers) -> Envelope:
    from engine.hl7.message import read_header

    return Envelope(channel="c", kind="hl7v2", payload=payload,
                    headers={**read_header(payload).as_headers(), **headers})


def test_route_when_takes_operators_and_reads_payload_fields():
    msg = env(adt(name="DOE^JANE", extra="OBX|1|NM|GLU||12\rOBX|2|NM|K||3.1"))
    assert matches({"MSH-9.1": "ADT", "PID-8": {"in": ["M", "U"]}}, msg)
    assert matches({"any": [{"PV1-2": "E"}, {"PID-5.1": {"regex": "^DO"}}]}, msg)
    assert not matches({"not": {"MSH-3": "HIS"}}, msg)
    assert matches({"OBX-5": {"gt": 10}}, msg)  # any OBX
    assert not matches({"OBX[2]-5": {"gt": 10}}, msg)
    assert matches({"PID-19": {"missing": True}, "PID-7": {"before": "1990-01-01"}}, msg)
    assert matches({"PID-3(1).4": "HOSP"}, msg)
    assert matches({"MSH-9.1": ["ADT", "ORU"], "MSH-9.2": "A0?"}, msg)  # the old forms


def test_route_when_with_operators_routes_in_a_running_engine(engine_factory):
    """Only the route whose rich condition holds gets a delivery."""
    from mllp_peers import RawClient, msa

    e = engine_factory("""
        store: {url: "sqlite:///data/m.db", blobs: data/blobs}
        keys: {kek_file: data/keys.json}
        channels:
          in:
            source: {type: mllp, host: 127.0.0.1, port: 0}
            routes:
              - name: minors
                when: {PID-7: {after: "-18y"}}
                to: {type: file, path: out/minors}
              - name: not-emergency
                when: {any: [{PV1-2: {not: E}}, {PV1-2: {missing: true}}]}
                to: {type: file, path: out/other}
        """)
    with RawClient(*e.address("in")) as c:
        assert msa(c.request(adt("M1")))[1] == "AA"
    e.wait_for(lambda: delivered_files(e.data_dir / "out" / "other"))
    assert not (e.data_dir / "out" / "minors").exists() or not list((e.data_dir / "out" / "minors").glob("*"))


# -- filter ------------------------------------------------------------------------------------
def test_filter_keep_and_drop_on_every_kind():
    f = build_filter(FilterConfig(type="filter", keep={"MSH-9.1": "ADT"}, drop={"PID-3.1": {"regex": "^TEST"}}))
    assert f(env(adt())) is not None
    with pytest.raises(Drop, match="keep condition"):
        f(env(adt().replace(b"ADT^A01", b"ORU^R01")))
    with pytest.raises(Drop, match="drop condition"):
        f(env(adt().replace(b"12345^^^HOSP", b"TEST1^^^HOSP")))
    fh = build_filter(FilterConfig(type="filter", keep={"Patient.gender": "female"}))
    pat = Envelope(channel="c", kind="fhir", payload=b'{"resourceType":"Patient","gender":"female"}')
    assert fh(pat) is pat
    with pytest.raises(Drop):
        fh(Envelope(channel="c", kind="fhir", payload=b'{"resourceType":"Patient","gender":"male"}'))


def test_filter_needs_a_condition_and_checks_it():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="keep:, drop: or both"):
        FilterConfig(type="filter")
    with pytest.raises(ValidationError, match="unknown operator"):
        FilterConfig(type="filter", keep={"A": {"bogus": 1}})
