"""DICOM de-identification: options, UID consistency, sequences, private tags, quarantine, pixels."""

import io
from pathlib import Path

import pydicom
import pytest
from conftest import delivered_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from structlog.testing import capture_logs

from engine.envelope import Drop, Envelope
from engine.registry import get
from transforms.deid_pseudonym import Pseudonymizer
from transforms.deidentify import DeidentifyConfig, PixelRule, Quarantine, build

SECRET = b"unit-test-secret-0123456789abcdef"
FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def ct(**changes) -> Dataset:
    ds = pydicom.dcmread(FILES / "CT_small.dcm")
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = "MRN12345"
    ds.StudyDate = "20240102"
    ds.PatientSex = "M"
    ds.PatientAge = "063Y"
    for k, v in changes.items():
        setattr(ds, k, v)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def run(ds: Dataset, **config) -> Dataset:
    transform = build(DeidentifyConfig(type="deidentify", **config), secret=SECRET)
    out = transform(Envelope(channel="t", kind="dicom", payload=to_bytes(ds)))
    return pydicom.dcmread(io.BytesIO(out.payload))


def codes(ds: Dataset) -> list[str]:
    return [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]


def test_registered_for_all_kinds():
    comp = get("transform", "deidentify")
    assert comp.config is DeidentifyConfig
    assert set(comp.kinds) == {"dicom", "hl7v2", "fhir"}


def test_config_rejects_both_date_options_and_unknown_keys():
    with pytest.raises(ValueError):
        DeidentifyConfig(type="deidentify", options=["retain_long_full_dates", "retain_long_modified_dates"])
    with pytest.raises(ValueError):
        DeidentifyConfig(type="deidentify", options=["retain_everything"])
    with pytest.raises(ValueError):
        DeidentifyConfig(type="deidentify", profil="basic")


def test_build_needs_a_secret():
    with pytest.raises(ValueError):
        build(DeidentifyConfig(type="deidentify"))


def test_basic_profile_markers_and_pseudonyms():
    src = ct()
    out = run(src)
    p = Pseudonymizer(SECRET)
    assert out.PatientIdentityRemoved == "YES"
    assert codes(out) == ["113100"]
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert out.PatientID == p.patient_id("MRN12345")
    assert str(out.PatientName) == "ANON^" + p.patient_name("MRN12345")[1]
    assert out.StudyDate == "" and out.PatientBirthDate == "" and out.PatientSex == ""
    assert "PatientAge" not in out
    assert out.StudyInstanceUID == p.uid(src.StudyInstanceUID)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.PixelData == src.PixelData
    assert not any(e.tag.is_private for e in out)


def test_options_change_actions_and_are_recorded():
    src = ct()
    out = run(src, options=["retain_uids", "retain_patient_characteristics", "retain_long_modified_dates"])
    assert out.SOPInstanceUID == src.SOPInstanceUID and out.StudyInstanceUID == src.StudyInstanceUID
    assert out.PatientSex == "M" and out.PatientAge == "063Y"
    shift = Pseudonymizer(SECRET).date_shift_days("MRN12345", 365)
    assert -365 <= shift <= -1
    from datetime import date, timedelta
    assert out.StudyDate == (date(2024, 1, 2) + timedelta(days=shift)).strftime("%Y%m%d")
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert sorted(codes(out)) == ["113100", "113107", "113108", "113110"]
    full = run(src, options=["retain_long_full_dates"])
    assert full.StudyDate == "20240102" and full.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_clean_descriptors_scrubs_identifiers_from_free_text():
    src = ct(StudyDescription="CT chest for DOE JOHN MRN12345")
    out = run(src, options=["clean_descriptors"])
    assert "DOE" not in out.StudyDescription and "MRN12345" not in out.StudyDescription
    assert out.StudyDescription.startswith("CT chest for")
    assert "StudyDescription" not in run(src)  # basic: X


def test_uids_consistent_across_two_instances_of_one_study():
    a = ct()
    b = ct()
    b.SOPInstanceUID = a.SOPInstanceUID + ".2"
    ref = Dataset()
    ref.ReferencedSOPClassUID = a.SOPClassUID
    ref.ReferencedSOPInstanceUID = a.SOPInstanceUID
    b.SourceImageSequence = Sequence([ref])  # X/Z/U*: removed here (Type 3), so also test a kept one
    b.ReferencedImageSequence = Sequence([ref])
    out_a = run(a)
    out_b = run(b, options=[])
    kept = run(b, options=["retain_uids"])
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert out_a[kw].value == out_b[kw].value != a[kw].value
    assert out_a.SOPInstanceUID != out_b.SOPInstanceUID
    assert "ReferencedImageSequence" not in out_b
    assert kept.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID


def test_references_inside_kept_sequences_follow_the_referenced_instance():
    a = ct()
    b = ct()
    b.SOPInstanceUID = a.SOPInstanceUID + ".2"
    item = Dataset()
    item.ReferencedSOPInstanceUID = a.SOPInstanceUID
    item.PatientName = "DOE^JOHN"
    b.AnatomicRegionSequence = Sequence([item])  # not in the table: kept, contents de-identified
    out_a, out_b = run(a), run(b)
    nested = out_b.AnatomicRegionSequence[0]
    assert nested.ReferencedSOPInstanceUID == out_a.SOPInstanceUID
    assert str(nested.PatientName).startswith("ANON^")


def _with_private(ds: Dataset) -> Dataset:
    block = ds.private_block(0x0041, "ACME SAFE", create=True)
    block.add_new(0x08, "DS", "1.5")
    block.add_new(0x09, "LO", "DOE^JOHN")
    inner = Dataset()
    inner.private_block(0x0031, "ACME SAFE", create=True).add_new(0x01, "LO", "secret")
    ds.AnatomicRegionSequence = Sequence([inner])
    return ds


def test_private_tags_removed_at_every_depth():
    out = run(_with_private(ct()))
    assert not any(e.tag.is_private for e in out)
    assert not any(e.tag.is_private for e in out.AnatomicRegionSequence[0])


def test_safe_private_kept_only_with_option_and_listed():
    src = _with_private(ct())
    safe = [{"creator": "ACME SAFE", "element": "0041,xx08"}]
    out = run(src, options=["retain_safe_private"], safe_private=safe)
    assert out[0x00411008].value == "1.5"
    assert out[0x00410010].value == "ACME SAFE"
    assert 0x00411009 not in out
    assert not any(e.tag.is_private for e in out.AnatomicRegionSequence[0])
    assert [e.tag for e in out if e.tag.is_private] == [0x00410010, 0x00411008]  # other creators gone
    assert "113111" in codes(out)
    assert 0x00411008 not in run(src, safe_private=safe)  # listed but option off


def test_quarantine_burned_in_annotation_and_modalities():
    with pytest.raises(Quarantine) as exc:
        run(ct(BurnedInAnnotation="YES"))
    assert isinstance(exc.value, Drop)
    assert exc.value.reason.startswith("quarantined: burned-in annotation")
    with pytest.raises(Quarantine):
        run(ct(Modality="US"))
    sc = pydicom.dcmread(FILES / "SC_rgb_small_odd.dcm")
    with pytest.raises(Quarantine):
        run(sc)
    assert run(ct(Modality="US"), quarantine={"modalities": [], "sop_classes": []}).Modality == "US"


def test_pixel_rule_blanks_rectangles_and_clears_burned_in_flag():
    src = ct(BurnedInAnnotation="YES", Manufacturer="ACME", ManufacturerModelName="Sono 1")
    rule = PixelRule(manufacturer="acme", model="SONO 1", rows=128, columns=128, rectangles=[(0, 0, 10, 2)])
    out = run(src, pixel_rules=[rule])
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in codes(out)
    before, after = src.PixelData, out.PixelData
    row = 128 * 2
    assert after[:20] == bytes(20) and after[row : row + 20] == bytes(20)  # rows 0 and 1, 10 px x 2 bytes
    assert after[20:row] == before[20:row] and after[2 * row :] == before[2 * row :]
    with pytest.raises(Quarantine):  # a rule for another model does not apply
        run(src, pixel_rules=[PixelRule(model="other", rectangles=[(0, 0, 1, 1)])])


def test_compressed_pixel_data_is_quarantined_even_with_a_rule():
    src = pydicom.dcmread(FILES / "SC_rgb_small_odd_jpeg.dcm")
    rule = PixelRule(rectangles=[(0, 0, 1, 1)])
    with pytest.raises(Quarantine) as exc:
        run(src, pixel_rules=[rule])
    assert "compressed" in exc.value.reason


def test_headers_carry_pseudonymous_uids_and_logs_carry_no_phi():
    src = ct()
    transform = build(DeidentifyConfig(type="deidentify"), secret=SECRET)
    env = Envelope(channel="t", kind="dicom", payload=to_bytes(src),
                   headers={"SOPInstanceUID": src.SOPInstanceUID, "Modality": "CT", "PatientID": "MRN12345"})
    with capture_logs() as logs:
        out = transform(env)
    assert out.headers["SOPInstanceUID"] == Pseudonymizer(SECRET).uid(src.SOPInstanceUID)
    assert out.headers["Modality"] == "CT" and "PatientID" not in out.headers
    assert out.lineage == (env.id,)
    text = repr(logs)
    assert "MRN12345" not in text and "DOE" not in text and src.SOPInstanceUID not in text


def test_channels_yaml_validates_deidentify_config(tmp_path):
    from engine.config import ConfigError, parse_settings

    text = """
channels:
  ct-in:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [CT01]}
    routes:
      - name: research
        transforms:
          - type: deidentify
            options: [retain_uids, retain_long_modified_dates]
            safe_private: [{creator: "SIEMENS CSA HEADER", element: "0029,xx08"}]
            quarantine: {modalities: [US]}
            pixel_rules: [{manufacturer: ACME, rectangles: [[0, 0, 640, 40]]}]
        to: {type: store}
"""
    parse_settings(text, tmp_path / "channels.yaml", env={})
    with pytest.raises(ConfigError, match=r"transforms\[0\]\.options\[0\]"):
        parse_settings(text.replace("retain_uids", "retain_uid"), tmp_path / "channels.yaml", env={})


# -- nesting (issue 9 item 1) ---------------------------------------------------------
def _nested(depth: int, *, undefined: bool) -> bytes:
    """An explicit VR little endian data set of Content Sequences nested ``depth`` deep, built as
    bytes (pydicom's writer recurses, so it cannot make the deep ones)."""
    import struct

    inner = struct.pack("<HH2sH", 0x0040, 0xA040, b"CS", 4) + b"TEXT"  # a ValueType at the bottom
    for _ in range(depth):
        if undefined:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            inner = (struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + item
                     + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
            inner = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, len(item)) + item
    return inner


def deep_sr(depth: int, *, undefined: bool = False, patient_id: str = "MRN12345") -> bytes:
    """A Comprehensive SR instance (Part 10) whose content tree is ``depth`` levels deep."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "DOE^JOHN", patient_id, "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    return to_bytes(ds) + _nested(depth, undefined=undefined)


@pytest.mark.parametrize("undefined", [False, True], ids=["defined-length", "undefined-length"])
@pytest.mark.parametrize("depth", [65, 300, 2000])
def test_too_deep_sequences_are_refused_cleanly(depth, undefined):
    """Past MAX_SEQUENCE_DEPTH the transform raises TooDeep (a ValueError the route dead-letters),
    never RecursionError: before the bound, 2 000 levels died inside pydicom or the walk."""
    from transforms.deid_limits import MAX_SEQUENCE_DEPTH, TooDeep

    transform = build(DeidentifyConfig(type="deidentify"), secret=SECRET)
    with pytest.raises(TooDeep, match=f"more than {MAX_SEQUENCE_DEPTH} levels"):
        transform(Envelope(channel="t", kind="dicom", payload=deep_sr(depth, undefined=undefined)))


@pytest.mark.parametrize("undefined", [False, True], ids=["defined-length", "undefined-length"])
def test_nesting_up_to_the_bound_is_deidentified(undefined):
    from transforms.deid_limits import MAX_SEQUENCE_DEPTH

    out = pydicom.dcmread(io.BytesIO(run_bytes(deep_sr(MAX_SEQUENCE_DEPTH, undefined=undefined))))
    assert out.PatientIdentityRemoved == "YES" and out.PatientID != "MRN12345"


def run_bytes(payload: bytes) -> bytes:
    transform = build(DeidentifyConfig(type="deidentify"), secret=SECRET)
    return transform(Envelope(channel="t", kind="dicom", payload=payload)).payload


def test_depth_is_measured_without_recursion():
    """The measure itself must survive what it refuses: 20 000 levels, default recursion limit."""
    from transforms.deid_limits import TooDeep, check_dataset_depth, check_json_depth

    ds = pydicom.dcmread(io.BytesIO(deep_sr(20_000)), force=True)
    with pytest.raises(TooDeep):
        check_dataset_depth(ds)
    assert check_dataset_depth(ds, limit=30_000) == 20_000
    doc: list = []
    for _ in range(20_000):
        doc = [doc]
    with pytest.raises(TooDeep):
        check_json_depth(doc)


def test_deeply_nested_fhir_is_refused_cleanly():
    from transforms.deid_limits import MAX_JSON_DEPTH, TooDeep

    transform = build(DeidentifyConfig(type="deidentify"), secret=SECRET)
    for depth in (MAX_JSON_DEPTH + 1, 5_000):
        payload = b'{"resourceType":"Observation","extension":' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(TooDeep):
            transform(Envelope(channel="t", kind="fhir", payload=payload))
    ok = b'{"resourceType":"Observation","status":"final","extension":' + b"[" * 50 + b"]" * 50 + b"}"
    assert transform(Envelope(channel="t", kind="fhir", payload=ok)).payload


@pytest.mark.dcmtk
def test_a_too_deep_instance_dead_letters_alone_and_the_route_goes_on(engine_factory, tmp_path):
    """Through a running engine: DCMTK storescu's 2 000-level instance is refused at intake with a
    failure status (the scan's bound) and the listener goes on; one that gets in another way (here
    straight into intake) is dead-lettered by the de-identification route with a reason that says
    why, audited as a failed de-identification, and the next instance on the route is
    de-identified."""
    from sqlalchemy import select

    from engine.store import schema
    from tests.dicom_peers import dicom_yaml, storescu

    routes = """
      - name: research
        transforms: [{type: deidentify}]
        to: {type: file, path: out}"""
    eng = engine_factory(dicom_yaml(routes=routes))
    port = eng.address("dcm")[1]
    deep, normal = tmp_path / "deep.dcm", tmp_path / "normal.dcm"
    deep.write_bytes(deep_sr(2_000))
    normal.write_bytes(deep_sr(3))
    proc = storescu(port, [deep])
    assert "Received Store Response" in proc.stdout and "(Success)" not in proc.stdout, proc.stdout
    proc = storescu(port, [normal])  # the listener lives
    assert "Received Store Response (Success)" in proc.stdout, proc.stdout
    eng.wait_for(lambda: len(delivered_files(eng.data_dir / "out")) == 1)
    ids = []
    for payload in (deep.read_bytes(), normal.read_bytes()):
        env = Envelope(channel="dcm", kind="dicom", payload=payload, headers={})
        ids.append(eng.call(eng.runtime.intake.submit(env)).message_id)
    d = schema.deliveries

    def states():
        with eng.store.engine.connect() as c:
            return {r.message_id: (r.state, r.last_error or "") for r in c.execute(select(d))}

    eng.wait_for(lambda: all(states().get(i, ("pending",))[0] != "pending" for i in ids), timeout=30)
    st = states()
    (s1, e1), (s2, _e2) = st[ids[0]], st[ids[1]]
    assert s1 == "dead" and "TooDeep" in e1 and "more than 64 levels" in e1, e1
    assert "RecursionError" not in e1
    assert s2 == "done"
    files = list((eng.data_dir / "out").iterdir())
    assert len(files) == 2 and not any(b"MRN12345" in f.read_bytes() for f in files)
    a = schema.audit_events
    with eng.store.engine.connect() as c:
        rows = [(r.message_id, r.outcome) for r in c.execute(select(a.c.message_id, a.c.outcome)
                                                            .where(a.c.action == "deid.apply"))]
    assert (ids[0], "failure") in rows and (ids[1], "success") in rows
