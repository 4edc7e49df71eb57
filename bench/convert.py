"""Conversion throughput next to the cost of merely parsing the same input, same run.

    .venv/bin/python bench/convert.py [--seconds 1.0]

For each transform: conversions per second, and per baseline (python-hl7 parse,
hl7apy parse_message, pydicom dcmread, fhir.resources model_validate of the output)
its rate and the ratio convert_time / baseline_time ("x baseline": how many parses
one conversion costs). Each measurement runs for about ``--seconds`` (at most 20,000
iterations), so the whole run stays well under a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hl7  # noqa: E402
import structlog  # noqa: E402
from fhir.resources.R4B.bundle import Bundle  # noqa: E402
from hl7apy.parser import parse_message  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from engine.envelope import Envelope  # noqa: E402
from engine.mapping.tables import Table  # noqa: E402
from transforms.dicom_to_fhir import DicomToFhirConfig  # noqa: E402
from transforms.dicom_to_fhir import build as dicom_to_fhir  # noqa: E402
from transforms.dicom_to_hl7 import DicomToHl7Config  # noqa: E402
from transforms.dicom_to_hl7 import build as dicom_to_hl7  # noqa: E402
from transforms.hl7_map import Hl7MapConfig  # noqa: E402
from transforms.hl7_map import build as hl7_map  # noqa: E402
from transforms.hl7_to_fhir import Hl7ToFhirConfig  # noqa: E402
from transforms.hl7_to_fhir import build as hl7_to_fhir  # noqa: E402
from transforms.hl7_to_worklist import Hl7ToWorklistConfig  # noqa: E402
from transforms.hl7_to_worklist import build as hl7_to_worklist  # noqa: E402

GOLDEN = ROOT / "conformance" / "golden" / "hl7"
MAX_ITER = 20_000
MAP_BUDGET = 2.0  # issue 16: ten rules on a 10-OBX ORU cost at most 2x hl7.parse of it


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second: a short warm-up, then as many calls as fit in ``seconds``."""
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while n < MAX_ITER:
        fn()
        n += 1
        if n % 8 == 0 and time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - start)


def hl7_text(name: str) -> tuple[bytes, str]:
    raw = (GOLDEN / f"{name}.hl7").read_bytes()
    text = raw.decode("utf-8", "replace").replace("\n", "\r").strip()
    return raw, text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # no debug noise
    s = args.seconds
    rows: list[tuple[str, float, list[tuple[str, float]]]] = []

    def env(kind: str, payload: bytes) -> Envelope:
        return Envelope(channel="bench", kind=kind, payload=payload)  # type: ignore[arg-type]

    # HL7 -> FHIR, two shapes: an ADT (small) and a 7-OBX ORU (larger)
    for name in ("adt_a01_inpatient_251", "oru_r01_lab_251"):
        raw, text = hl7_text(name)
        t = hl7_to_fhir(Hl7ToFhirConfig(type="hl7_to_fhir"))
        e = env("hl7v2", raw)
        out = json.loads(t(e).payload)
        t_nv = hl7_to_fhir(Hl7ToFhirConfig(type="hl7_to_fhir", validate_output=False))
        rows.append((f"hl7_to_fhir {name}", rate(lambda t=t, e=e: t(e), s), [
            ("hl7_to_fhir without validation", rate(lambda t=t_nv, e=e: t(e), s)),
            ("python-hl7 hl7.parse", rate(lambda x=text: hl7.parse(x), s)),
            ("hl7apy parse_message", rate(lambda x=text: parse_message(x), s)),
            ("fhir.resources Bundle.model_validate (output)", rate(lambda b=out: Bundle.model_validate(b), s)),
        ]))

    # Orders -> worklist item
    raw, text = hl7_text("omi_o23_new_251")
    t = hl7_to_worklist(Hl7ToWorklistConfig(type="hl7_to_worklist"))
    e = env("hl7v2", raw)
    rows.append(("hl7_to_worklist omi_o23_new_251", rate(lambda: t(e), s), [
        ("python-hl7 hl7.parse", rate(lambda: hl7.parse(text), s)),
        ("hl7apy parse_message", rate(lambda: parse_message(text), s)),
    ]))

    # DICOM -> FHIR / HL7 (CT_small, no aggregate store: the transform alone)
    dcm = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    e = env("dicom", dcm)
    t = dicom_to_fhir(DicomToFhirConfig(type="dicom_to_fhir"))
    out = json.loads(t(e).payload)

    def read() -> object:
        return dcmread(BytesIO(dcm), force=True, stop_before_pixels=True)

    rows.append(("dicom_to_fhir CT_small", rate(lambda: t(e), s), [
        ("pydicom dcmread (stop_before_pixels)", rate(read, s)),
        ("fhir.resources Bundle.model_validate (output)", rate(lambda: Bundle.model_validate(out), s)),
    ]))
    for message in ("ORU^R01", "OMI^O23"):
        t = dicom_to_hl7(DicomToHl7Config(type="dicom_to_hl7", message=message))
        msg_text = t(e).payload.decode()
        t_nv = dicom_to_hl7(DicomToHl7Config(type="dicom_to_hl7", message=message, validate_output=False))
        rows.append((f"dicom_to_hl7 {message} CT_small", rate(lambda t=t: t(e), s), [
            ("dicom_to_hl7 without hl7apy validation", rate(lambda t=t_nv: t(e), s)),
            ("pydicom dcmread (stop_before_pixels)", rate(read, s)),
            ("hl7apy parse_message (output)", rate(lambda m=msg_text: parse_message(m), s)),
        ]))

    # hl7_map: ten rules (the five and five more) on an ORU with 10 OBX
    map_text, map_t = map_bench()
    e = env("hl7v2", map_text.encode())
    map_rate, parse_rate = rate(lambda: map_t(e), s), rate(lambda: hl7.parse(map_text), s)
    rows.append(("hl7_map 10 rules ORU^R01 (10 OBX)", map_rate, [("python-hl7 hl7.parse", parse_rate)]))

    print(f"{'conversion / baseline':58} {'per s':>10} {'x baseline':>11}")
    for name, conv, baselines in rows:
        print(f"{name:58} {conv:10.0f}")
        for bname, brate in baselines:
            print(f"  {bname:56} {brate:10.0f} {brate / conv:10.1f}x")
    ratio = parse_rate / map_rate
    print(f"hl7_map budget: {ratio:.2f}x hl7.parse (at most {MAP_BUDGET}x): {'ok' if ratio <= MAP_BUDGET else 'OVER'}")
    return 0 if ratio <= MAP_BUDGET else 1


class _Tables:
    """Stands in for a component context: the settings' loaded tables."""

    class settings:
        tables = {"lab": Table("lab", ("code", "target_code", "target_display"), {
            c: {"code": c, "target_code": f"{n}-0", "target_display": f"LOINC {c}"}
            for n, c in enumerate(["GLU", "K", "NA", "CREA", "HB"])})}


MAP_RULES = [
    {"set": {"MSH-5": "LIS", "MSH-6": "MAIN"}},
    {"copy": {"from": "PID-3.1", "to": "PID-2"}},
    {"delete": ["ZPI", "PID-19"]},
    {"lookup": {"field": "OBX-3.1", "table": "lab",
                "set": {"OBX-3.1": "target_code", "OBX-3.2": "target_display", "OBX-3.3": "LN"}}},
    {"when": {"PV1-2": "E"}, "then": [{"set": {"PV1-3.1": "ER"}}]},
    {"when": {"OBX-2": "NM", "OBX-5": {"not": {"regex": r"^-?\d+(\.\d+)?$"}}}, "then": [{"set": {"OBX-2": "ST"}}]},
    {"set": {"OBX-11": "F"}},
    {"when": {"OBX-5": {"gt": 8}}, "then": [{"set": {"OBX-8": "H"}}]},
    {"add": {"PID-3": ["A1", "", "", "OLD", "PI"]}},
    {"when": {"PID-8": {"in": ["F", "M"]}}, "then": [{"set": {"PID-8": "F"}}]},
]


def map_bench() -> tuple[str, object]:
    """An ORU^R01 with 10 OBX and the hl7_map transform of MAP_RULES (a CSV-like table of 5 codes)."""
    obx = "".join(f"OBX|{i}|NM|{c}^Local {c}^L||{4 + i * 0.5}|mmol/L|3.5-5.1|N|||F|||20240301080000\r"
                  for i, c in enumerate(["GLU", "K", "NA", "CREA", "HB", "CL", "CA", "MG", "PHOS", "ALB"], 1))
    text = ("MSH|^~\\&|LAB|LABFAC|HIS|HOSP|20240301101500||ORU^R01^ORU_R01|C1|P|2.5.1\r"
            "PID|1||123456^^^HOSP^MR||DOE^JANE||19700215|F|||||||||||||||999\rPV1|1|E|W1^R2^B3\rZPI|x\r"
            "OBR|1|PL-77|FL-5501|24331-1^Lipid panel^LN|||20240301080000\r" + obx)
    return text, hl7_map(Hl7MapConfig(type="hl7_map", rules=MAP_RULES), _Tables())


if __name__ == "__main__":
    raise SystemExit(main())
