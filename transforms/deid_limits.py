"""How deep de-identification follows nesting, and the clean failure past it.

DICOM sequences and FHIR JSON nest without a limit in their encodings, and the readers and
writers we use (pydicom, ``json``) and our own walks recurse once or more per level: 2 000
nested DICOM sequences made de-identification die in a RecursionError (issue 9 item 1),
from somewhere inside pydicom or our walk, saying nothing useful. So a message is measured
first, iteratively, and one nested deeper than a real one ever is gets ``TooDeep``: the
route dead-letters that one message (a transform failure is permanent) with a reason an
operator can read, the de-identification is audited as failed, and the worker goes on with
the next message. Nothing partially de-identified is ever sent.

The bounds are far above real data (structured report content trees are a few to a few
dozen levels deep; FHIR resources a dozen or two) and far below what the recursive readers
and writers manage within Python's default recursion limit from a worker thread. The DICOM
bound is the one the listener already applies at intake (``engine.store.dicom.scan``, for
Little Endian data sets); this check covers what intake cannot (big endian, deflated, a
message that came another way).
"""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from engine.store.dicom.scan import MAX_SEQUENCE_DEPTH  # the DICOM listener refuses deeper at intake

__all__ = ["MAX_JSON_DEPTH", "MAX_SEQUENCE_DEPTH", "TooDeep", "check_dataset_depth", "check_json_depth"]

MAX_JSON_DEPTH = 100  # FHIR: arrays and objects within each other (the document itself is depth 1)


class TooDeep(ValueError):
    """The message nests deeper than de-identification follows; it is refused whole."""


def check_dataset_depth(ds: Dataset, limit: int = MAX_SEQUENCE_DEPTH) -> int:
    """The deepest sequence nesting of ``ds`` (without recursion); ``TooDeep`` past ``limit``.

    Reading each sequence's items converts one level of pydicom's lazily parsed values,
    which the de-identification walk would do anyway.
    """
    deepest = 0
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, depth = stack.pop()
        for tag in list(current.keys()):
            if _vr(current, tag) != "SQ":
                continue
            if depth + 1 > limit:
                raise TooDeep(f"DICOM sequences nested more than {limit} levels deep; "
                              "de-identification refuses the data set")
            deepest = max(deepest, depth + 1)
            stack.extend((item, depth + 1) for item in current[tag].value or [])
    return deepest


def _vr(ds: Dataset, tag: Any) -> str:
    """The element's VR, converting its value only when the encoding does not say (implicit VR, UN)."""
    vr = getattr(ds.get_item(tag), "VR", None)
    if vr in (None, "UN"):
        vr = ds[tag].VR
    return str(vr)


def check_json_depth(doc: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """The deepest nesting of arrays and objects in ``doc`` (without recursion); ``TooDeep`` past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth > limit:
            raise TooDeep(f"JSON nested more than {limit} levels deep; de-identification refuses the document")
        deepest = max(deepest, depth)
        stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest
