"""The message search terms of a C-STORE come from what the listener read (no second read of
the payload in the committer), and they are the terms that second read would have given."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from engine.messages import MessageFilter, query_messages
from engine.store import message_terms as mt
from engine.store.dicom import index as idx
from listeners.dicom_store import search_identifiers
from tests.dicom_peers import data_file, dicom_yaml, store_statuses, storescu

KEY = b"k" * 32


def _attrs(part10: bytes) -> dict:
    return idx.extract(idx.read_index_dataset(part10))


def _variant(tmp: Path, name: str, **values: str) -> Path:
    ds = dcmread(get_testdata_file(name))
    for kw, v in values.items():
        setattr(ds, kw, v)
    out = tmp / f"{name}-{len(list(tmp.iterdir()))}.dcm"
    ds.save_as(out)
    return out


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
                                  "rtplan.dcm"])
def test_given_identifiers_give_the_terms_the_payload_gives(name):
    part10 = Path(get_testdata_file(name)).read_bytes()
    attrs = _attrs(part10)
    headers = {"StudyInstanceUID": attrs["STUDY"]["StudyInstanceUID"]}
    assert mt.terms_of(KEY, "dicom", part10, headers, search_identifiers(attrs)) == mt.terms_of(
        KEY, "dicom", part10, headers)


@pytest.mark.parametrize("values", [
    {"PatientID": "MRN-7\\OTHER-8", "AccessionNumber": " ACC-1 "},  # two values (LO is VM 1: a peer's bytes)
    {"PatientID": "", "AccessionNumber": "A"},                        # empty PatientID
    {"SpecificCharacterSet": "ISO_IR 100", "PatientID": "M\u00dcLLER-1", "AccessionNumber": "\u00c9-2"},
    {"SpecificCharacterSet": "ISO_IR 192", "PatientID": "\u60a3\u8005-3"},
])
def test_given_identifiers_on_edge_values(tmp_path, values):
    part10 = _variant(tmp_path, "CT_small.dcm", **values).read_bytes()
    attrs = _attrs(part10)
    headers = {"StudyInstanceUID": attrs["STUDY"]["StudyInstanceUID"]}
    given = search_identifiers(attrs)
    assert given == {f: v for f, v in mt.identifiers("dicom", part10, headers).items() if f != "control_id"} | {
        "control_id": set()}
    assert mt.terms_of(KEY, "dicom", part10, headers, given) == mt.terms_of(KEY, "dicom", part10, headers)


@pytest.mark.dcmtk
def test_storescu_instance_is_found_by_patient_id_without_the_committer_reading_it(engine_factory, tmp_path,
                                                                                    monkeypatch):
    """With the payload reader of message_terms broken, a C-STORE's message still gets its terms:
    they come from the listener. (Before: the committer read the payload, so this found nothing.)"""
    def no_read(payload, headers):
        raise AssertionError("the committer read the payload again")

    monkeypatch.setattr(mt, "_dicom", no_read)
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    f = _variant(tmp_path, "CT_small.dcm", PatientID="MRN-SEARCH-1", AccessionNumber="ACC-SEARCH-1")
    assert store_statuses(storescu(port, [f, data_file("MR_small.dcm")]).stdout) == ["Success", "Success"]
    ds = dcmread(f)

    def ids(**flt) -> list[str]:
        return [r["id"] for r in query_messages(e.store, MessageFilter(**flt)).rows]

    found = ids(patient_id="mrn-search-1")
    assert len(found) == 1
    assert ids(accession="ACC-SEARCH-1") == found and ids(study_uid=str(ds.StudyInstanceUID)) == found
    assert mt._GIVEN == {}  # nothing left behind once the submits returned
