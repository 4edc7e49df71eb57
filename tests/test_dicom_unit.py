"""Matching rules, status table, config validation and the index, without a network peer."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.dataset import Dataset

from engine.crypto import KeyRing
from engine.store import dicom_index as idx
from engine.store.db import Store
from listeners import dicom_match as m
from listeners.dicom import DicomSourceConfig
from listeners.dicom_status import TABLES
from tests.dicom_peers import data_file


def key(kw: str, vr: str, value) -> m.Key:
    return m.Key(kw, 0, vr, value)


@pytest.mark.parametrize("actual,vr,query,expected", [
    ("DOE^JOHN", "PN", "DOE^JOHN", True),
    ("Doe^John", "PN", "DOE^JOHN", True),  # case-insensitive PN (configurable)
    ("DOE^JOHN", "PN", "DOE*", True),
    ("DOE^JOHN", "PN", "D?E^*", True),
    ("DOE^JOHN", "PN", "SMITH*", False),
    ("CT", "CS", "CT", True),
    ("CT", "CS", "ct", False),  # only PN folds case
    ("20040119", "DA", "20040101-20040131", True),
    ("20040119", "DA", "-20031231", False),
    ("20040119", "DA", "20040119-", True),
    ("072730", "TM", "07-08", True),
    ("072730.5", "TM", "0800-", False),
    ("1.2.3", "UI", "1.2.4\\1.2.3", True),
    ("1.2.3", "UI", "1.2.30", False),
    (["CT", "MR"], "CS", "MR", True),
    (None, "LO", "X", False),
    ("anything", "LO", "*", True),
    ("7", "IS", "7", True),
])
def test_value_matching(actual, vr, query, expected):
    assert m.value_matches(actual, key("K", vr, query)) is expected


def test_case_sensitive_pn_option():
    assert not m.value_matches("Doe^John", key("PatientName", "PN", "DOE^JOHN"), fold_pn=False)


def test_status_table_codes_are_ps34():
    assert TABLES["C-STORE"]["out_of_resources"].code == 0xA700
    assert TABLES["C-STORE"]["mismatch"].code == 0xA900
    assert TABLES["C-STORE"]["cannot_understand"].code == 0xC000
    assert TABLES["C-MOVE"]["unknown_destination"].code == 0xA801
    assert "unknown_destination" not in TABLES["C-GET"]


def test_config_requires_an_allow_list():
    with pytest.raises(ValidationError, match="calling_aets"):
        DicomSourceConfig(type="dicom")
    assert DicomSourceConfig(type="dicom", allow_any_calling_aet=True).host == "127.0.0.1"
    with pytest.raises(ValidationError):
        DicomSourceConfig(type="dicom", calling_aets=["A\\B"])
    with pytest.raises(ValidationError):
        DicomSourceConfig(type="dicom", calling_aets=["X" * 17])


def test_response_has_only_requested_keys():
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientName = ""
    q.StudyInstanceUID = ""
    keys = m.keys_of(q)
    rsp = m.response({"PatientName": "Müller^Jürgen", "StudyInstanceUID": "1.2", "PatientID": "X"}, keys,
                     "STUDY", lambda kw: None, {})
    assert set(rsp.dir()) == {"QueryRetrieveLevel", "PatientName", "StudyInstanceUID", "SpecificCharacterSet"}
    assert rsp.SpecificCharacterSet == "ISO_IR 192"


def test_index_keeps_phi_sealed(tmp_path):
    store = Store(f"sqlite:///{tmp_path}/s.db", tmp_path / "blobs", KeyRing(tmp_path / "k.json"))
    store.migrate()
    raw = data_file("CT_small.dcm").read_bytes()
    attrs = idx.extract(dcmread(data_file("CT_small.dcm"), stop_before_pixels=True))
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    with store.engine.begin() as conn:
        assert idx.index_instance(conn, store, hkey, attrs, message_id="m1", transfer_syntax="1.2.840.10008.1.2.1",
                                  digest="d", size=len(raw)) == "indexed"
        assert idx.index_instance(conn, store, hkey, attrs, message_id="m2", transfer_syntax="1.2.840.10008.1.2.1",
                                  digest="d", size=len(raw)) == "exists"
    with store.engine.connect() as conn:
        c = idx.Candidates(conn, store, "PATIENT")
        c.add(idx.patients.c.pid_hmac == idx.keyed(hkey, "PatientID", "1CT1\x00"))
        rows = list(c.rows())
        assert len(rows) == 1 and rows[0][1]["PatientName"] == "CompressedSamples^CT1"
        assert c.derived(rows[0][0], "NumberOfPatientRelatedInstances") == 1
    blob = (tmp_path / "s.db").read_bytes()
    assert b"CompressedSamples" not in blob and b"1CT1" not in blob
    with pytest.raises(idx.MissingKeys):
        with store.engine.begin() as conn:
            idx.index_instance(conn, store, hkey, {"IMAGE": {}}, message_id="m3", transfer_syntax="x", digest="d",
                               size=1)
    store.dispose()
