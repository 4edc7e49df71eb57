"""Which `when:` and `debounce.key` keys a message of each kind can have, for `medrelay check`.

``engine.match`` answers a key it does not know with "missing", so a typo
(`MHS-9.1`, `Modalty`) silently routes nothing, or everything that a negated rule
lets through. This module is the vocabulary behind the check that turns such a key
into a config error naming the closest known key. It follows ``engine.match.lookup``
exactly: a header the listener sets, else what ``_from_payload`` can read:

* HL7 v2: positions ``SEG-f[.c[.s]]`` in the grammar ``engine.match`` reads them with
  (``engine.mapping.hl7.parse_hl7_path``) whose segment is an HL7 v2 segment id
  (hl7apy's tables, v2.1 to v2.8.2) or a Z-segment, and whose field and component the
  segment has (``check_position``, v2.5.1 and v2.8.2 shapes);
* DICOM: the listener's headers and pydicom's data dictionary keywords;
* FHIR: the listener's headers and dotted element paths of R4 resources (the
  fhir.resources R4B models; the first step always, deeper steps when the model says
  what the element is). A literal ``resourceType`` in the same `when:` narrows the
  check to those resources.

The vocabularies are loaded lazily, once, and only for the kinds a config uses.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any

ANY_KIND = frozenset({"kind", "event"})  # kind: engine.match.lookup answers it; event: event messages
PRIMITIVE = object()  # a FHIR element holding a value, not elements

# Headers the listeners set (listeners/mllp.py via Header.as_headers, listeners/dicom_store.py,
# listeners/fhir_app.py). HL7 headers are MSH positions, valid as positions anyway.
DICOM_HEADERS = frozenset({"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                           "TransferSyntaxUID", "CallingAETitle", "CalledAETitle",
                           # MPPS event messages (listeners/dicom_mpps.py)
                           "dimse", "mpps_uid", "mpps_state", "mpps_previous_state"})
FHIR_HEADERS = frozenset({"resourceType", "interaction", "id"})

# Preferred when two segment ids are equally close to a typo (MHS: MSH, not BHS).
_COMMON_SEGMENTS = ("MSH", "EVN", "PID", "PD1", "NK1", "PV1", "PV2", "ORC", "OBR", "OBX", "NTE", "AL1", "DG1",
                    "PR1", "IN1", "GT1", "MRG", "SPM", "TQ1", "TXA", "SCH", "AIS", "MSA", "ERR", "RXA", "RXE")
_HL7_VERSIONS = ("2_1", "2_2", "2_3", "2_3_1", "2_4", "2_5", "2_5_1", "2_6", "2_7", "2_8", "2_8_1", "2_8_2")
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_Z_SEGMENT = re.compile(r"^Z[A-Z0-9]{2}$")
_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4})[, ]?([0-9A-Fa-f]{4})\)?$")


# The combinators of the condition language (engine/mapping/conditions.py): their values are
# conditions, not values, and their names are not keys.
_LIST_COMBINATORS = ("any", "all")
_NOT = "not"


def condition_keys(when: Any, path: tuple[Any, ...] = (), scope: Mapping[str, Any] | None = None
                   ) -> Iterator[tuple[tuple[Any, ...], str, Any, Mapping[str, Any]]]:
    """Every key a ``when:`` reads, with its path inside ``when``, its test and the mapping that
    narrows it (the innermost one naming a ``resourceType``), through any/all/not."""
    if not isinstance(when, Mapping):
        return
    here = when if "resourceType" in when or scope is None else scope
    for k, v in when.items():
        name = str(k)
        if name in _LIST_COMBINATORS and isinstance(v, list):
            for j, sub in enumerate(v):
                yield from condition_keys(sub, (*path, name, j), here)
        elif name == _NOT and isinstance(v, Mapping):
            yield from condition_keys(v, (*path, name), here)
        else:
            yield (*path, name), name, v, here


def problem(kind: str | None, key: str, when: Mapping[str, Any] | None = None) -> str | None:
    """Why no ``kind`` message can have ``key`` (with the closest known key), or None if it can.

    ``kind`` is the source's message kind (hl7v2, dicom, fhir); another or no kind is
    not checked. ``when`` is the rest of the condition (a FHIR ``resourceType`` narrows).
    """
    if key in ANY_KIND or kind not in ("hl7v2", "dicom", "fhir"):
        return None
    if kind == "hl7v2":
        return _hl7_problem(key)
    if kind == "dicom":
        return _dicom_problem(key)
    return _fhir_problem(key, when or {})


def value_problem(kind: str | None, key: str, value: Any) -> str | None:
    """A literal value no message can have: a FHIR ``resourceType`` that is not an R4 resource."""
    if kind != "fhir" or key != "resourceType":
        return None
    for v in _literals(value):
        if any(c in v for c in "*?[") or v in fhir_resources():
            continue
        return f"{v!r} is not a FHIR R4 resource type" + _did_you_mean(v, fhir_resources())
    return None


def _literals(value: Any) -> list[str]:
    """The plain values of a test (``Patient``, ``[Patient, Group]``, ``{in: [...]}``); [] for other tests."""
    if isinstance(value, Mapping):
        return _literals(value["in"]) if set(value) == {"in"} else []
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, str | int | float) and not isinstance(v, bool)]
    return [str(value)] if isinstance(value, str) else []


def _did_you_mean(word: str, choices: Iterable[str], prefer: Iterable[str] = ()) -> str:
    best = closest(word, choices, prefer)
    return f" (did you mean {best}?)" if best else ""


def closest(word: str, choices: Iterable[str], prefer: Iterable[str] = ()) -> str | None:
    """The known name a typo most likely meant: same letters in another case first, then difflib."""
    pool = list(choices)
    folded = {c.casefold(): c for c in pool}
    if word.casefold() in folded:
        return folded[word.casefold()]
    near = difflib.get_close_matches(word, pool, n=6, cutoff=0.6)
    if not near:
        return None
    preferred = [n for n in near if n in set(prefer)]
    return preferred[0] if preferred else near[0]


# -- HL7 v2 ----------------------------------------------------------------------
@lru_cache(maxsize=1)
def hl7_segments() -> frozenset[str]:
    """Segment ids of every HL7 v2 version hl7apy describes (v2.1 to v2.8.2)."""
    import importlib

    out: set[str] = set()
    for v in _HL7_VERSIONS:
        try:
            out.update(importlib.import_module(f"hl7apy.v{v}.segments").SEGMENTS)
        except ImportError:  # an hl7apy without this version: the others still count
            continue
    return frozenset(s for s in out if _SEGMENT_ID.match(s))


def _hl7_segment_of(key: str) -> str:
    """The segment of an HL7 routing key as ``engine.match`` parses it; ValueError if it is none."""
    try:
        from engine.mapping.hl7 import parse_hl7_path
    except ImportError:  # the older grammar, should the mapping room be absent
        from engine.hl7.message import parse_path

        return parse_path(key)[0]
    return parse_hl7_path(key).segment


def _hl7_shape_problem(key: str) -> str | None:
    """A field or component the segment does not have (``PID-300``), in the mapping room's words."""
    try:
        from engine.mapping.hl7 import check_position, parse_hl7_path
    except ImportError:
        return None
    try:
        check_position(parse_hl7_path(key))
    except ValueError as e:
        return None if "unknown segment" in str(e) else str(e)  # an older version's segment: known here
    return None


def _hl7_problem(key: str) -> str | None:
    try:
        seg = _hl7_segment_of(key)
    except ValueError:
        fixed = _hl7_respelled(key)
        hint = f" (did you mean {fixed}?)" if fixed else ""
        return (f"unknown routing key {key!r}: HL7 v2 keys are field positions like MSH-9.1, PID-8, "
                f"PID-3[2].1, OBX[2]-5{hint}")
    if seg in hl7_segments() or _Z_SEGMENT.match(seg):
        shape = _hl7_shape_problem(key)
        return f"unknown routing key {key!r}: {shape}" if shape else None
    best = closest(seg, hl7_segments(), _COMMON_SEGMENTS)
    hint = f" (did you mean {key.replace(seg, best, 1)}?)" if best else ""
    return f"unknown routing key {key!r}: {seg} is not an HL7 v2 segment{hint}"


def _hl7_respelled(key: str) -> str | None:
    """``msh.9.1``, ``MSH_9_1``, ``MSH9.1`` -> ``MSH-9.1`` when that is a valid position."""
    m = re.match(r"^\s*([A-Za-z][A-Za-z0-9]{2})[-._ ]?(\d+)(?:[._](\d+))?(?:[._](\d+))?\s*$", key)
    if not m:
        return None
    seg = m.group(1).upper()
    if seg not in hl7_segments() and not _Z_SEGMENT.match(seg):
        return None
    cand = f"{seg}-" + ".".join(g for g in m.groups()[1:] if g)
    try:
        _hl7_segment_of(cand)
    except ValueError:
        return None
    return cand


# -- DICOM -----------------------------------------------------------------------
@lru_cache(maxsize=1)
def dicom_keywords() -> frozenset[str]:
    from pydicom.datadict import keyword_dict

    return frozenset(k for k in keyword_dict if k) | DICOM_HEADERS


def _dicom_problem(key: str) -> str | None:
    if key in dicom_keywords():
        return None
    m = _TAG.match(key.strip())
    if m:
        from pydicom.datadict import keyword_for_tag

        kw = keyword_for_tag(int(m.group(1) + m.group(2), 16))
        hint = f": use its keyword {kw}" if kw else ": only keywords are understood"
        return f"unknown routing key {key!r}: DICOM keys are data dictionary keywords, not tags{hint}"
    return (f"unknown routing key {key!r}: not a DICOM keyword nor a header of DICOM messages"
            + _did_you_mean(key, dicom_keywords(), sorted(DICOM_HEADERS)))


# -- FHIR ------------------------------------------------------------------------
def _fhir_module() -> Any:
    try:
        import fhir.resources.R4B as mod
    except ImportError:  # fhir.resources without R4B: its default (R5) models
        import fhir.resources as mod  # type: ignore[no-redef]
    return mod


@lru_cache(maxsize=1)
def fhir_resources() -> frozenset[str]:
    """Every resource type of the models (143 in R4B); imports them all, so only when needed."""
    import importlib
    import pkgutil

    mod = _fhir_module()
    base = importlib.import_module(f"{mod.__name__}.resource").Resource
    names: set[str] = set()
    for info in pkgutil.iter_modules(mod.__path__):
        m = _import_or_none(f"{mod.__name__}.{info.name}")
        for v in vars(m).values() if m is not None else ():
            if isinstance(v, type) and issubclass(v, base) and v.__module__ == m.__name__:
                names.add(v.get_resource_type())
    return frozenset(names)


def _import_or_none(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except Exception:  # a model module that fails to import names no resource
        return None


@lru_cache(maxsize=512)
def _fhir_model(name: str) -> Any:
    try:
        return _fhir_module().get_fhir_model_class(name)
    except (KeyError, ValueError, AttributeError):
        return None


@lru_cache(maxsize=512)
def _elements(model: Any) -> dict[str, Any]:
    """JSON element name -> the model of that element (PRIMITIVE for a value, None when unknown)."""
    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        if name == "fhir_comments":
            continue
        out[f.alias or name] = _element_model(f.annotation)
    return out


def _element_model(annotation: Any) -> Any:
    """Unwrap Optional / List / Annotated down to a fhir.resources ``XxxType``, and load Xxx."""
    for _ in range(6):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        name = getattr(annotation, "__name__", "")
        if name.endswith("Type") and not args:
            return _fhir_model(name[:-4])
        if not args:
            return PRIMITIVE if isinstance(annotation, type) else None
        annotation = args[0]
    return None


def _fhir_problem(key: str, when: Mapping[str, Any]) -> str | None:
    if key in FHIR_HEADERS:
        return None
    literal = _literals(when.get("resourceType"))
    if literal and all(not any(c in v for c in "*?[") for v in literal):
        types = [t for t in literal if t in fhir_resources()]
        if not types:
            return None  # value_problem reports the resourceType itself
    else:
        types = sorted(fhir_resources())
    steps = key.split(".")
    models = [m for m in (_fhir_model(t) for t in types) if m is not None]
    first = {name: model for m in models for name, model in _elements(m).items()}
    if steps[0] not in first:
        where = "/".join(types) if len(types) <= 3 else "any FHIR R4 resource"
        return (f"unknown routing key {key!r}: {steps[0]} is not an element of {where} nor a header of "
                "FHIR messages" + _did_you_mean(steps[0], [*first, *sorted(FHIR_HEADERS)]))
    candidates = [_elements(m).get(steps[0]) for m in models if steps[0] in _elements(m)]
    for i, step in enumerate(steps[1:], start=1):
        prefix = ".".join(steps[:i])
        if candidates and all(m is PRIMITIVE for m in candidates):
            return f"unknown routing key {key!r}: {prefix} is a value, it has no element {step}"
        known = [m for m in candidates if m is not None and m is not PRIMITIVE]
        if not known:
            return None  # a type we cannot see into: match reads whatever is there
        names = {name: model for m in known for name, model in _elements(m).items()}
        if step not in names:
            return (f"unknown routing key {key!r}: {prefix} has no element {step}"
                    + _did_you_mean(step, names))
        candidates = [_elements(m).get(step) for m in known if step in _elements(m)]
    return None
