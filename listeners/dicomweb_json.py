"""The DICOM JSON model (PS3.18 F.2) of query results and instance metadata.

pydicom's ``DataElement.to_json_dict`` does the encoding (PN groups, numbers, base64
InlineBinary, sequences); this module only decides what goes by reference: a
element with a binary VR longer than ``BULK_THRESHOLD`` bytes, and Pixel Data always,
becomes a BulkDataURI under the instance's ``/bulkdata/{tag}`` -- inside sequences
``/bulkdata/{tag}/{item}/{tag}...`` (e.g. an ECG's WaveformData, which inline would grow
the metadata by a third of the waveform again in base64) -- so a viewer's /metadata call
never downloads pixels or samples (F.2.7; the URI is ours to shape).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

BULK_VRS = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "UN"))
BULK_THRESHOLD = 1024
MAX_DEPTH = 8  # sequence nesting followed for BulkDataURIs (deeper values stay inline)
PIXEL_DATA = 0x7FE00010
DICOM_JSON = "application/dicom+json"


def _element(elem: DataElement) -> dict[str, Any]:
    # values inside sequences stay inline (base64): a BulkDataURI names top-level tags only
    return elem.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=2**62)


def is_bulk(elem: DataElement) -> bool:
    if int(elem.tag) == PIXEL_DATA or int(elem.tag) in (0x7FE00008, 0x7FE00009):
        return True
    if elem.VR not in BULK_VRS or elem.value is None:
        return False
    try:
        return len(elem.value) > BULK_THRESHOLD
    except TypeError:
        return False


def dataset_json(ds: Dataset, *, bulk_uri: Callable[[str], str] | None = None,
                 extra: Iterable[tuple[int, dict[str, Any]]] = (), _path: str = "") -> dict[str, Any]:
    """One data set as a DICOM JSON object (group 0002 and group lengths left out).

    With ``bulk_uri`` (metadata), bulk values become ``{"vr": .., "BulkDataURI": bulk_uri(path)}``,
    path being ``7FE00010`` at the top level, ``54000100/0/54001010`` inside a sequence item;
    ``extra`` adds or overrides elements (e.g. RetrieveURL), keys being tags.
    """
    out: dict[str, Any] = {}
    for elem in ds:
        tag = int(elem.tag)
        if tag >> 16 == 0x0002 or tag & 0xFFFF == 0:
            continue
        path = f"{_path}{tag:08X}"
        if bulk_uri is not None and is_bulk(elem):
            out[f"{tag:08X}"] = {"vr": elem.VR if elem.VR in BULK_VRS else "OB", "BulkDataURI": bulk_uri(path)}
            continue
        if bulk_uri is not None and elem.VR == "SQ" and path.count("/") < 2 * MAX_DEPTH and elem.value:
            out[f"{tag:08X}"] = {"vr": "SQ", "Value": [
                dataset_json(item, bulk_uri=bulk_uri, _path=f"{path}/{n}/") for n, item in enumerate(elem.value)]}
            continue
        try:
            out[f"{tag:08X}"] = _element(elem)
        except Exception:  # one value pydicom cannot encode (bad bytes): given without Value
            out[f"{tag:08X}"] = {"vr": elem.VR}
    for tag, value in extra:
        out[f"{tag:08X}"] = value
    return dict(sorted(out.items()))


def ur(value: str) -> dict[str, Any]:
    return {"vr": "UR", "Value": [value]}
