"""Self-check of a DICOM de-identifier against PS3.15 Table E.1-1, scored like MIDI-B.

Takes pydicom's own test files (only ones on local disk: a missing test file makes
pydicom try the network), injects synthetic PHI into every attribute of Table
E.1-1 (all rows with a VR pydicom knows, plus a guess from the name for the rows
newer than pydicom's dictionary), into a nested sequence the table does not name,
and into private blocks; then runs the de-identifier on two instances of one
study and checks every required action. The score is the percentage of correct
actions; every miss is listed with its path so a failure reads like a bug report.

Accepted outcomes per action (a compound action accepts any of its parts):
  X  absent                       Z  present, empty or a value with no PHI
  D  present, non-empty, no PHI   K  present and unchanged
  U  a valid UID, not the original, the same for the same original in both instances
  C  absent, or present with no PHI (and a date that is not the original)
A final sweep flags any injected PHI left anywhere outside K attributes.

``score(transform)`` takes any ``Callable[[Dataset], Dataset]``, so the bench can
score other tools on the same ground. Run: ``python -m conformance.deid.selfcheck``.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from transforms.deid_table import OPTIONS, Row, effective_action, load_table

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DEFAULT_FILES = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "rtdose.dcm", "reportsi.dcm",
    "liver_1frame.dcm", "examples_overlay.dcm", "priv_SQ.dcm",
)
UID_ROOT = "1.2.826.0.1.3680043.10.999."
PHI = "PHI"
PHI_DATE = "20010203"
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
NEST_SEQ = 0x00082218  # Anatomic Region Sequence: not in the table, so only its contents are acted on
NESTED = (0x00100010, 0x00100020, 0x00080020, 0x00081155, 0x00080080, 0x00101040, 0x00401001)
PRIVATE_GROUP = 0x0009
PRIVATE_CREATOR = "MEDRELAY SELFCHECK"

Transform = Callable[[Dataset], Dataset]
Path_ = tuple[Any, ...]


@dataclass
class Miss:
    file: str
    path: str
    name: str
    expected: str
    got: str


@dataclass
class Result:
    checked: int = 0
    correct: int = 0
    misses: list[Miss] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.correct / self.checked if self.checked else 0.0

    def add(self, ok: bool, miss: Miss) -> None:
        self.checked += 1
        if ok:
            self.correct += 1
        else:
            self.misses.append(miss)

    def summary(self) -> str:
        return f"{self.percent:.2f}% ({self.correct}/{self.checked} actions), {len(self.misses)} misses"


@dataclass
class Expect:
    path: Path_
    name: str
    actions: frozenset[str]
    original: Any
    vr: str


# -- injection ---------------------------------------------------------------------------
def _guess_vr(name: str) -> str:
    """VR for table rows newer than pydicom's dictionary, from the attribute's name."""
    if name.endswith("Sequence"):
        return "SQ"
    if name.endswith("DateTime"):
        return "DT"
    if name.endswith("Comment"):
        return "LT"
    if name.endswith("URI"):
        return "UR"
    return "LO"


def _value(vr: str, tag: int, instance: int, name: str) -> Any:
    h = f"{tag:08X}"
    if vr == "UI":
        return UID_ROOT + str(tag) + (f".{instance}" if name in ("SOP Instance UID",) else "")
    return {
        "PN": f"{PHI}DOE{h[-4:]}^{PHI}JOHN",
        "DA": PHI_DATE, "DT": PHI_DATE + "040506", "TM": "040506", "AS": "045Y",
        "IS": "4242", "DS": "42.42", "US": 4242, "SS": 4242, "UL": 424242, "SL": 424242,
        "UV": 4242, "SV": 4242, "FL": 42.5, "FD": 42.5, "AT": 0x00100010,
        "UR": f"http://phi.example/{h}",
        "ST": f"{PHI} text {h} about {PHI}DOE", "LT": f"{PHI} text {h} about {PHI}DOE",
        "UT": f"{PHI} text {h} about {PHI}DOE", "UC": f"{PHI} {h}",
    }.get(vr, f"{PHI}{h}" if vr in ("CS", "SH", "AE", "LO") else b"PHIBYTES")


def _sq_item(instance: int) -> Dataset:
    item = Dataset()
    item.add_new(0x00081150, "UI", "1.2.840.10008.5.1.4.1.1.2")
    item.add_new(0x00081155, "UI", UID_ROOT + "81155." + str(instance))
    item.add_new(0x0040A123, "PN", f"{PHI}NESTED^{PHI}PERSON")
    return item


def _row_vr(tag: int, row: Row) -> str:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return _guess_vr(row.name)


def _targets(table: Any) -> Iterable[tuple[int, Row]]:
    for tag, row in table.exact.items():
        if tag >> 16 not in (0x0000, 0x0002):  # command set: never in a file; file meta: checked apart
            yield tag, row
    for _mask, value, row in table.masks:
        yield (value | 0x0005 if row.tag == "(50xx,xxxx)" else value), row


def inject(ds: Dataset, instance: int, options: frozenset[str]) -> list[Expect]:
    """Put PHI into every table attribute (top level and one nested item) and private blocks."""
    table = load_table()
    expects: list[Expect] = []
    for tag, row in _targets(table):
        vr = _row_vr(tag, row)
        value = Sequence([_sq_item(instance)]) if vr == "SQ" else _value(vr, tag, instance, row.name)
        ds.add_new(tag, vr, value)
        actions = frozenset(effective_action(row, options).replace("*", "").split("/"))
        expects.append(Expect((tag,), row.name, actions, copy.deepcopy(value), vr))
    nest = Dataset()
    for tag in NESTED:
        row = table.exact[tag]
        vr = _row_vr(tag, row)
        nest.add_new(tag, vr, _value(vr, tag, instance, row.name))
        actions = frozenset(effective_action(row, options).replace("*", "").split("/"))
        expects.append(Expect((NEST_SEQ, 0, tag), row.name + " (nested)", actions, nest[tag].value, vr))
    ds.add_new(NEST_SEQ, "SQ", Sequence([nest]))
    priv = "C" if "retain_safe_private" in options else "X"
    for holder, prefix in ((ds, ()), (nest, (NEST_SEQ, 0))):
        holder.add_new((PRIVATE_GROUP << 16) | 0x0010, "LO", PRIVATE_CREATOR)
        holder.add_new((PRIVATE_GROUP << 16) | 0x1001, "LO", f"{PHI} private")
        holder.add_new((PRIVATE_GROUP << 16) | 0x1002, "SQ", Sequence([_sq_item(instance)]))
        for el in (0x1001, 0x1002):
            tag = (PRIVATE_GROUP << 16) | el
            expects.append(Expect((*prefix, tag), f"private {tag:08X}", frozenset(priv), holder[tag].value, "LO"))
    for elem in list(ds):  # private attributes that came with the file
        if elem.tag.is_private and not elem.tag.is_private_creator and elem.tag.group != PRIVATE_GROUP:
            expects.append(Expect((int(elem.tag),), f"private {int(elem.tag):08X}", frozenset(priv),
                                  elem.value, str(elem.VR)))
    ds.BurnedInAnnotation = "NO"
    return expects


# -- checking -----------------------------------------------------------------------------
def _get(ds: Dataset, path: Path_) -> Any:
    node: Any = ds
    for i, step in enumerate(path):
        if isinstance(step, int) and i % 2 == 1:
            seq = node
            if step >= len(seq):
                return None
            node = seq[step]
            continue
        if step not in node:
            return None
        node = node[step].value if i < len(path) - 1 else node[step]
    return node


def _strings(value: Any) -> list[str]:
    if isinstance(value, Sequence):
        out: list[str] = []
        for item in value:
            for el in item:
                out.extend(_strings(el.value))
        return out
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return [str(v) for v in value]
    return [] if value is None else [str(value)]


def _has_phi(value: Any, originals: set[str]) -> bool:
    return any(PHI in s or PHI_DATE in s or s in originals for s in _strings(value))


def _empty(value: Any) -> bool:
    return value in (None, "", b"") or (isinstance(value, Sequence | list) and len(value) == 0)


def _check(action: str, exp: Expect, elem: Any, originals: set[str]) -> bool:
    present = elem is not None
    value = elem.value if present else None
    if action == "X":
        return not present
    if action == "K":  # a kept sequence stays; its items' attributes are checked on their own
        if present and elem.VR == "UN" and isinstance(value, bytes):  # implicit VR, tag unknown to pydicom
            return exp.vr == "SQ" or value.decode("latin-1").rstrip(" \0") == str(exp.original)
        if exp.vr == "SQ":
            return present and len(value or []) == len(exp.original)
        return present and value == exp.original
    if action == "Z":
        return present and (_empty(value) or not _has_phi(value, originals))
    if action == "D":
        return present and not _empty(value) and not _has_phi(value, originals) and value != exp.original
    if action == "U":
        if exp.vr == "SQ":
            return present and not _has_phi(value, originals)
        return present and isinstance(value, str) and bool(UID_RE.match(value)) and len(value) <= 64 \
            and value != exp.original
    if action == "C":
        if not present:
            return True
        if exp.vr in ("DA", "DT"):
            return value != exp.original and not _empty(value)
        if exp.vr == "TM":
            return True
        return not _has_phi(value, originals)
    raise ValueError(action)


def _sweep(ds: Dataset, keep: set[Path_], originals: set[str], path: Path_ = ()) -> list[str]:
    leaks = []
    for elem in ds:
        p = (*path, int(elem.tag))
        if p in keep or elem.tag == 0x00120064:
            continue
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                leaks.extend(_sweep(item, keep, originals, (*p, i)))
        elif elem.VR not in ("TM", "AS") and _has_phi(elem.value, originals):
            leaks.append(_fmt(p))
    return leaks


def _fmt(path: Path_) -> str:
    return "/".join(f"({s >> 16:04X},{s & 0xFFFF:04X})" if i % 2 == 0 else f"[{s}]" for i, s in enumerate(path))


def _load(name: str) -> Dataset:
    path = TEST_FILES / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not among pydicom's local test files")
    return pydicom.dcmread(path)


def score_file(transform: Transform, name: str, options: frozenset[str], result: Result) -> None:
    """Inject, transform two instances of one study, and add every check to ``result``."""
    base = _load(name)
    inputs, expects, outputs = [], [], []
    for instance in (1, 2):
        ds = copy.deepcopy(base)
        expects.append(inject(ds, instance, options))
        inputs.append(ds)
    # Injected UIDs count as PHI where they must be replaced; under retain_uids they stay by design.
    originals = set() if "retain_uids" in options else {
        s for e in expects[0] + expects[1] for s in _strings(e.original) if s.startswith(UID_ROOT)
    }
    for ds in inputs:
        try:
            outputs.append(transform(copy.deepcopy(ds)))
        except Exception as exc:  # a tool that crashes scores zero on this file
            result.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            for exp in expects[0]:
                result.add(False, Miss(name, _fmt(exp.path), exp.name, "/".join(sorted(exp.actions)), "crash"))
            return
    uid_map: dict[str, set[str]] = {}
    for exps, out in zip(expects, outputs, strict=True):
        keep = set()
        for exp in exps:
            elem = _get(out, exp.path)
            ok = any(_check(a, exp, elem, originals) for a in exp.actions)
            if "K" in exp.actions:
                keep.add(exp.path)
            got = "absent" if elem is None else repr(elem.value)[:60]
            result.add(ok, Miss(name, _fmt(exp.path), exp.name, "/".join(sorted(exp.actions)), got))
            if exp.vr == "UI" and elem is not None and "U" in exp.actions:
                uid_map.setdefault(str(exp.original), set()).add(str(elem.value))
        leaks = _sweep(out, keep, originals)
        result.add(not leaks, Miss(name, "*", "PHI sweep", "no injected PHI left", ", ".join(leaks)[:300]))
        result.add(
            out.get("PatientIdentityRemoved") == "YES"
            and any(i.get("CodeValue") == "113100" for i in out.get("DeidentificationMethodCodeSequence", [])),
            Miss(name, "(0012,0062)", "identity removed + CID 7050 113100", "YES + 113100", "missing"),
        )
    for original, news in uid_map.items():  # same original UID -> same new UID in both instances
        result.add(len(news) == 1, Miss(name, "*", f"UID consistency {original}", "one replacement", str(news)))
    sops = [str(o.get("SOPInstanceUID")) for o in outputs]
    result.add(sops[0] != sops[1], Miss(name, "(0008,0018)", "distinct SOP Instance UIDs", "differ", str(sops)))


def score(transform: Transform, files: Iterable[str] = DEFAULT_FILES, options: Iterable[str] = ()) -> Result:
    """Score ``transform`` (Dataset -> Dataset) on ``files`` for the basic profile plus ``options``."""
    opts = frozenset(options)
    unknown = opts - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}")
    result = Result()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on tags newer than its dictionary
        for name in files:
            score_file(transform, name, opts, result)
    return result


def medrelay_transform(options: Iterable[str] = (), secret: bytes = b"selfcheck-secret" * 2) -> Transform:
    """medrelay's deidentify as a Dataset -> Dataset callable (through bytes, like the engine)."""
    import io

    from transforms.deid_pseudonym import Pseudonymizer
    from transforms.deidentify import DeidentifyConfig, deidentify_dicom

    config = DeidentifyConfig(type="deidentify", options=list(options))
    pseudo = Pseudonymizer(secret)

    def run(ds: Dataset) -> Dataset:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return pydicom.dcmread(io.BytesIO(deidentify_dicom(buf.getvalue(), config, pseudo)))

    return run


def main(argv: list[str] | None = None) -> int:
    opts = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")]
    result = score(medrelay_transform(opts), options=opts)
    for miss in result.misses:
        print(f"MISS {miss.file} {miss.path} {miss.name}: expected {miss.expected}, got {miss.got}")
    for err in result.errors:
        print("ERROR", err)
    print(f"medrelay deidentify, options {opts or '(basic)'}: {result.summary()}")
    return 0 if result.percent == 100.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
