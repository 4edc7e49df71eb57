"""Matching rules, status table, config validation and the index, without a network peer."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.dataset import Dataset

from engine.security.crypto import KeyRing
from engine.store.db import Store
from engine.store.dicom import index as idx
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


def test_index_into_known_series_only_for_new_instances_of_indexed_series(tmp_path, store_url):
    """The one-statement insert writes only a new instance of an indexed series; the first
    instance of a series and a re-sent SOP Instance UID fall back to the full path."""
    store = Store(store_url, tmp_path / "blobs", KeyRing(tmp_path / "k.json"))
    store.migrate()
    attrs = idx.extract(dcmread(data_file("CT_small.dcm"), stop_before_pixels=True))
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    kw = {"transfer_syntax": "1.2.840.10008.1.2.1", "digest": "d", "size": 10, "channel": "c"}
    with store.engine.begin() as conn:
        assert not idx.index_into_known_series(conn, attrs, message_id="m1", **kw)  # series not indexed yet
        assert idx.index_instance(conn, store, hkey, attrs, message_id="m1", **kw) == "indexed"
        assert not idx.index_into_known_series(conn, attrs, message_id="m2", **kw)  # instance already there
        other = {**attrs, "IMAGE": {**attrs["IMAGE"], "SOPInstanceUID": "1.2.3.4.5.6", "InstanceNumber": 7}}
        assert idx.index_into_known_series(conn, other, message_id="m3", **kw)
        found = idx.find(conn, hkey, other)
    assert found.message_id == "m3" and found.series_pk is not None and found.digest == "d"
    with store.engine.connect() as conn:
        row = idx.existing_instance(conn, "1.2.3.4.5.6")
    assert row["instance_number"] == 7 and row["series_pk"] == found.series_pk and row["channel"] == "c"
    store.dispose()


def _index_read(path):
    from pydicom.errors import InvalidDicomError

    try:
        return idx.read_index_dataset(open(path, "rb").read())
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, NotImplementedError):
        return None


def test_extract_matches_pydicom():
    """The raw-bytes fast path of the index extraction gives exactly what pydicom's
    conversions give, over every DICOM file bundled with pydicom and pydicom-data."""
    import warnings

    from tests.dicom_peers import _ROOTS

    files = sorted({str(f) for root in _ROOTS for f in root.rglob("*")
                    if f.is_file() and (f.suffix.lower() == ".dcm" or not f.suffix)})
    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            fast_ds, slow_ds = _index_read(f), _index_read(f)
            if fast_ds is None:
                continue
            assert idx.extract(fast_ds) == idx.extract(slow_ds, fast=False), f
            compared += 1
    assert compared > 100


@pytest.mark.parametrize("vr_values", [
    {"PatientName": b"Doe^John \x00", "PatientID": b" ID 7 ", "OtherPatientIDs": b"A \\B \\",
     "StudyDate": b"20260101 ", "ImageType": b"ORIGINAL\\PRIMARY\\AXIAL ", "SeriesNumber": b" +12 ",
     "PatientWeight": b"71.50 ", "PatientSize": b"1.7e0", "InstanceNumber": b"1.0", "AcquisitionNumber": b"x",
     "StudyInstanceUID": b"1.2.3\x00", "NameOfPhysiciansReadingStudy": b"A^B\\C^D ", "PatientComments": b"a\\b ",
     "Rows": b"\x00\x02", "StudyID": b"\\"},
    {"PatientName": b"", "PatientID": b"", "StudyDate": b"", "StudyTime": b"", "AccessionNumber": b"",
     "SeriesNumber": b"", "PatientWeight": b"", "Rows": b"", "ImageType": b"", "SOPInstanceUID": b"1.2.3"},
])
def test_extract_fast_path_edge_values(vr_values):
    """Padding, multiplicity, signs, exponents and values pydicom rejects: both paths agree."""
    import struct
    import warnings

    from pydicom.datadict import dictionary_VR, tag_for_keyword

    data = b""  # Explicit VR Little Endian, short-form elements in tag order
    for tag, raw in sorted((tag_for_keyword(kw), raw) for kw, raw in vr_values.items()):
        data += struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, dictionary_VR(tag).encode(), len(raw)) + raw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = idx.extract(idx.read_index_data_set(data, "1.2.840.10008.1.2.1"))
        slow = idx.extract(idx.read_index_data_set(data, "1.2.840.10008.1.2.1"), fast=False)
    assert fast == slow


def test_scan_matches_pydicom():
    """dicom_scan reads the same raw index elements as pydicom's reader, or declines
    (ScanError), over every bundled file in both Little Endian encodings."""
    import warnings

    from pydicom import dcmread as read
    from pydicom.errors import InvalidDicomError

    from engine.store.dicom.scan import ScanError, scan
    from tests.dicom_peers import _ROOTS

    files = sorted({f for root in _ROOTS for f in root.rglob("*")
                    if f.is_file() and (f.suffix.lower() == ".dcm" or not f.suffix)})
    scanned = declined = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            raw = f.read_bytes()
            try:
                ds = read(f, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, NotImplementedError, TypeError):
                continue
            ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            if ts is None or not ts.is_little_endian or ts.is_deflated or not raw[128:132] == b"DICM":
                continue
            meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
            data = raw[meta_end:]
            try:
                fast = idx.extract(scan(data, idx._SCAN_TAGS, implicit=ts.is_implicit_VR))
            except ScanError:
                declined += 1
                continue
            slow = idx.extract(idx.read_index_data_set(data, str(ts), scan_ok=False), fast=False)
            assert fast == slow, f
            scanned += 1
    assert scanned > 100 and declined < scanned // 10, (scanned, declined)


def test_scan_refuses_damaged_data_sets_cleanly():
    """Truncated or corrupted data sets end in ScanError (the caller then asks pydicom), never
    in another exception or a loop that does not end."""
    import random
    import struct

    from engine.store.dicom.scan import ScanError, scan

    raw = data_file("CT_small.dcm").read_bytes()
    data = raw[144 + int.from_bytes(raw[140:144], "little"):]
    rng = random.Random(7)
    for _ in range(300):
        damaged = bytearray(data[:rng.randrange(8, len(data))])
        for _ in range(rng.randrange(0, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            scan(bytes(damaged), idx._SCAN_TAGS, implicit=False)
        except (ScanError, struct.error):
            pass
    with pytest.raises(ScanError):
        scan(b"\x08\x00\x18\x00UI\xff\x7f" + b"1" * 10, idx._SCAN_TAGS, implicit=False)  # past the end
    with pytest.raises(ScanError):
        scan(b"\x08\x00\x18\x00ZZ\x02\x001\x00", idx._SCAN_TAGS, implicit=False)  # no such VR


def test_a_literal_start_gives_only_terms_its_values_have():
    """The narrowing of DOE* / DOE^J* is sound: for values with accents, ligatures, case and
    separators cut anywhere, the terms of the cut are among the value's stored terms."""
    import random

    from engine.store.dicom import terms

    key = b"k" * 32
    alphabet = "ABCDEOJÜßﬁıİΣσς'^= -.,ÅÉé\u0301\u2026\u00bd1"
    rng = random.Random(9)
    for _ in range(3000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        stored = {t for _s, t in terms.level_terms(key, "PATIENT", {"PatientName": value})}
        for cut in range(len(value) + 1):
            want = terms.query_terms(key, "PatientName", value[:cut] + "*")
            assert want is None or set(want) <= stored, (value, cut)
        exact = terms.query_terms(key, "PatientName", value)
        assert exact is None or set(exact) <= stored, value


def _nest(depth: int, *, implicit: bool, undefined: bool) -> bytes:
    """Content Sequences nested ``depth`` deep around a ValueType, as a bare Little Endian data set."""
    import struct

    def head(group: int, elem: int, vr: bytes, length: int) -> bytes:
        if implicit:
            return struct.pack("<HHI", group, elem, length)
        if vr in (b"SQ", b"OB"):
            return struct.pack("<HH2sHI", group, elem, vr, 0, length)
        return struct.pack("<HH2sH", group, elem, vr, length)

    inner = head(0x0040, 0xA040, b"CS", 4) + b"TEXT"
    for _ in range(depth):
        if undefined:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            inner = head(0x0040, 0xA730, b"SQ", 0xFFFFFFFF) + item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = head(0x0040, 0xA730, b"SQ", len(item)) + item
    pid = head(0x0010, 0x0020, b"LO", 4) + b"P123"
    return pid + inner


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_scan_bounds_sequence_nesting_without_recursion(implicit, undefined):
    """64 levels are read, 65 and 20 000 are refused with NestingTooDeep (which the listener answers
    with a failure status and pydicom is never asked to read), at the default recursion limit."""
    from engine.store.dicom.scan import MAX_SEQUENCE_DEPTH, NestingTooDeep

    ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    ok = idx.read_index_data_set(_nest(MAX_SEQUENCE_DEPTH, implicit=implicit, undefined=undefined), ts)
    assert ok.get("PatientID") == "P123"
    for depth in (MAX_SEQUENCE_DEPTH + 1, 20_000):
        with pytest.raises(NestingTooDeep):
            idx.read_index_data_set(_nest(depth, implicit=implicit, undefined=undefined), ts)


def test_scan_skips_encapsulated_fragments_inside_items():
    """An icon image with encapsulated pixel data inside a sequence item: its fragments are skipped
    as bytes (they would not parse as elements), and what follows is read."""
    import struct

    frag = b"\x00\x11\x22\x33" * 3
    pixel = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
             + struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE000, len(frag)) + frag
             + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(pixel)) + pixel
    icon = struct.pack("<HH2sHI", 0x0088, 0x0200, b"SQ", 0, len(item)) + item
    pid = struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", 4) + b"P123"
    modality = struct.pack("<HH2sH", 0x0008, 0x0060, b"CS", 2) + b"CT"
    after = struct.pack("<HH2sH", 0x0400, 0x0100, b"UI", 4) + b"1.2\0"  # an element after the icon
    from engine.store.dicom.scan import scan

    ds = scan(modality + pid + icon + after, {0x00100020, 0x04000100}, implicit=False)  # no pydicom fallback
    assert ds.get_item(0x00100020).value == b"P123" and ds.get_item(0x04000100).value == b"1.2\0"
