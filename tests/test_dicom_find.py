"""C-FIND against the archive index with DCMTK findscu: levels, wildcards, ranges, UID lists."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.dicom_peers import data_file, dicom_yaml, findscu, storescu_any

pytestmark = pytest.mark.dcmtk

FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "693_UNCI.dcm")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """One engine with five instances (five patients and studies), shared by the read-only queries below."""
    from tests.conftest import EngineThread

    d = tmp_path_factory.mktemp("find")
    e = EngineThread(dicom_yaml(), d)
    port = e.address("dcm")[1]
    files = [data_file(n) for n in FILES]
    assert storescu_any(port, files) == ["Success"] * len(files)
    yield port, {n: dcmread(f, stop_before_pixels=True) for n, f in zip(FILES, files, strict=True)}, d
    e.stop()


def q(archive, level, keys, model="-S"):
    port, _, d = archive
    proc, res = findscu(port, level, keys, model=model, out_dir=d / "rsp")
    assert "Error" not in proc.stdout or "0x0000" in proc.stdout, proc.stdout
    return res


def test_patient_level_wildcards(archive):
    res = q(archive, "PATIENT", {"PatientName": "compressedsamples^*", "PatientID": "",
                                 "NumberOfPatientRelatedStudies": ""}, model="-P")
    assert sorted(r.PatientID for r in res) == ["1CT1", "4MR1", "8NM1"]
    assert {int(r.NumberOfPatientRelatedStudies) for r in res} == {1}
    res = q(archive, "PATIENT", {"PatientName": "*MR?", "PatientID": ""}, model="-P")
    assert [r.PatientID for r in res] == ["4MR1"]
    res = q(archive, "PATIENT", {"PatientID": "id00001", "PatientName": ""}, model="-P")
    assert [str(r.PatientName) for r in res] == ["Last^First^mid^pre"]
    # only the requested keys plus QueryRetrieveLevel come back
    assert set(res[0].dir()) == {"PatientID", "PatientName", "QueryRetrieveLevel"}


def test_patient_level_refused_in_study_root(archive):
    port, _, d = archive
    proc, res = findscu(port, "PATIENT", {"PatientID": ""}, model="-S", out_dir=d / "rsp")
    assert res == [] and "DataSetDoesNotMatchSOPClass" in proc.stdout  # DCMTK name of 0xA900, proc.stdout


def test_study_level_date_ranges(archive):
    res = q(archive, "STUDY", {"StudyDate": "20040101-20041231", "StudyInstanceUID": "", "ModalitiesInStudy": "",
                               "NumberOfStudyRelatedInstances": "", "PatientName": ""})
    assert sorted(r.StudyDate for r in res) == ["20040119", "20040826", "20040826"]
    assert sorted(r.ModalitiesInStudy for r in res) == ["CT", "MR", "NM"]
    assert {int(r.NumberOfStudyRelatedInstances) for r in res} == {1}
    assert len(q(archive, "STUDY", {"StudyDate": "-20031231", "StudyInstanceUID": ""})) == 1
    assert len(q(archive, "STUDY", {"StudyDate": "20040201-", "StudyInstanceUID": ""})) == 2
    assert len(q(archive, "STUDY", {"StudyDate": "20040119", "StudyInstanceUID": ""})) == 1
    assert len(q(archive, "STUDY", {"StudyTime": "070000-080000", "StudyInstanceUID": ""})) == 1
    assert len(q(archive, "STUDY", {"StudyInstanceUID": ""})) == 5


def test_study_level_uid_list_and_modalities(archive):
    _, ds, _ = archive
    uids = [str(ds["CT_small.dcm"].StudyInstanceUID), str(ds["rtplan.dcm"].StudyInstanceUID), "1.2.3.4"]
    res = q(archive, "STUDY", {"StudyInstanceUID": "\\".join(uids)})
    assert sorted(r.StudyInstanceUID for r in res) == sorted(uids[:2])
    res = q(archive, "STUDY", {"ModalitiesInStudy": "NM", "StudyInstanceUID": ""})
    assert [r.StudyInstanceUID for r in res] == [ds["JPEG2000.dcm"].StudyInstanceUID]
    res = q(archive, "STUDY", {"ModalitiesInStudy": "CT\\MR", "StudyInstanceUID": ""})
    assert len(res) == 3


def test_series_and_image_levels(archive):
    _, ds, _ = archive
    mr_study = str(ds["MR_small.dcm"].StudyInstanceUID)
    res = q(archive, "SERIES", {"StudyInstanceUID": mr_study, "SeriesInstanceUID": "", "Modality": "",
                                "NumberOfSeriesRelatedInstances": ""})
    assert [r.Modality for r in res] == ["MR"]
    res = q(archive, "SERIES", {"Modality": "C?", "SeriesInstanceUID": ""})
    assert len(res) == 2
    res = q(archive, "IMAGE", {"StudyInstanceUID": mr_study, "SOPInstanceUID": "", "SOPClassUID": "",
                               "InstanceNumber": ""})
    assert [int(r.InstanceNumber) for r in res] == [1]
    sops = [str(ds["CT_small.dcm"].SOPInstanceUID), str(ds["693_UNCI.dcm"].SOPInstanceUID)]
    res = q(archive, "IMAGE", {"SOPInstanceUID": "\\".join(sops), "InstanceNumber": ""})
    assert sorted(r.SOPInstanceUID for r in res) == sorted(sops)
    res = q(archive, "IMAGE", {"PatientID": "1CT1", "SOPInstanceUID": ""}, model="-P")
    assert [r.SOPInstanceUID for r in res] == [ds["CT_small.dcm"].SOPInstanceUID]


def test_worklist_find_answers(archive):
    """Modality Worklist C-FIND is served (items come from engine.store.dicom.worklist; none stored here)."""
    port, _, d = archive
    proc, res = findscu(port, "", {"PatientName": "*", "ScheduledProcedureStepSequence[0].Modality": "CT"},
                        model="-W", out_dir=d / "mwl")
    assert "Received Final Find Response (Success)" in proc.stdout, proc.stdout
    assert res == []


# -- at the speed of an index (issue 9 item 12) --------------------------------------
# A few thousand instances, synthesised and filed through the index code (the network
# would only make the set-up slow); queries then count the decryptions they cause.
N = 3000
CT = "1.2.840.10008.5.1.4.1.1.2"
FAMILIES = ("SMITH", "JONES", "MÜLLER", "GARCIA", "NGUYEN", "DOE", "DOERR", "O'DOE", "DOE-SMITH", "KIM",
            "ÅSTRÖM", "ŁUKASZ", "straße", "ﬁnn", "ΣΩΚΡΑΤΗΣ")
GIVEN = ("JOHN", "JANE", "J", "ANNA", "JÜRGEN", "MARIA", "ıSMAIL", "ZOË", "")


def synth(i: int) -> dict:
    family, given = FAMILIES[i % len(FAMILIES)], GIVEN[(i // len(FAMILIES)) % len(GIVEN)]
    uid = f"1.2.826.0.1.3680043.10.9.{i}"
    return {
        "PATIENT": {"PatientName": f"{family}^{given}" if given else family, "PatientID": f"PID{i:06d}"},
        "STUDY": {"StudyInstanceUID": uid, "StudyDate": "20240101", "AccessionNumber": f"A{i:06d}"},
        "SERIES": {"SeriesInstanceUID": uid + ".1", "Modality": "CT"},
        "IMAGE": {"SOPInstanceUID": uid + ".1.1", "SOPClassUID": CT},
    }


def fill(store, n: int = N) -> list[dict]:
    from engine.store.dicom import index as idx

    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    rows = [synth(i) for i in range(n)]
    with store.engine.begin() as conn:
        for i, a in enumerate(rows):
            idx.index_instance(conn, store, hkey, a, message_id=f"s{i}", transfer_syntax="1.2.840.10008.1.2.1",
                               digest="d", size=1)
    return rows


class Decryptions:
    """Counts the blob reads (each one a decryption) made through a store."""

    def __init__(self, store) -> None:
        self.n = 0
        real = store.get_blob

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)

        store.get_blob = counted

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def expected(rows: list[dict], keyword: str, value: str, fold: bool) -> list[str]:
    """The oracle: PS3.4 matching applied to the clear attributes, no index involved."""
    from listeners import dicom_match as m

    level = "PATIENT" if keyword.startswith("Patient") else "STUDY"
    key = m.Key(keyword, 0, "PN" if keyword == "PatientName" else ("LO" if keyword == "PatientID" else "SH"), value)
    return sorted(r["STUDY"]["StudyInstanceUID"] for r in rows if m.value_matches(r[level][keyword], key,
                                                                                   fold_pn=fold))


def find(store, level: str, keyword: str, value: str, *, fold: bool = True) -> list[str]:
    import types

    from listeners.dicom_qr import QueryRetrieve

    qr = QueryRetrieve(types.SimpleNamespace(store=store, keyring=store.keyring, channel="t"), ae_title="T",
                       fold_pn=fold, move_destinations={})
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    setattr(ds, keyword, value)
    ds.StudyInstanceUID = ""
    ds.PatientID = ds.PatientID if keyword == "PatientID" else ""
    return [str(r.get("StudyInstanceUID") or r.PatientID) for r in qr.find_responses(ds, "patient")]


QUERIES = [  # (keyword, value, level): exact keys and wildcards with a literal start
    ("PatientID", "PID000123", "STUDY"), ("PatientID", "PID00012*", "STUDY"), ("AccessionNumber", "A000077", "STUDY"),
    ("PatientName", "DOE*", "STUDY"), ("PatientName", "DOE^J*", "STUDY"), ("PatientName", "DOE^JOHN", "STUDY"),
    ("PatientName", "doe*", "STUDY"), ("PatientName", "MÜLLER^J?RGEN", "STUDY"), ("PatientName", "O'DOE*", "STUDY"),
    ("PatientName", "DOE-SMITH^ANNA", "STUDY"), ("PatientName", "ΣΩΚ*", "STUDY"), ("PatientName", "STRASSE*", "STUDY"),
    ("PatientName", "FINN^ZOË", "STUDY"), ("PatientName", "ﬁnn*", "STUDY"), ("PatientName", "GARCIA^MARIA\\KIM",
                                                                             "STUDY"),
]


def test_exact_keys_and_prefix_wildcards_decrypt_only_their_matches(store):
    """Exact PatientID / AccessionNumber / PatientName and DOE* / DOE^J* wildcards are narrowed in
    SQL by the blind terms: the only rows decrypted are the ones that match (two blobs each at
    STUDY level: patient and study), not the 3 000 of the archive."""
    rows = fill(store)
    count = Decryptions(store)
    for keyword, value in (("PatientID", "PID000123"), ("AccessionNumber", "A000077"), ("PatientName", "DOE*"),
                           ("PatientName", "DOE^J*"), ("PatientName", "DOE^JOHN"), ("PatientID", "PID00012*")):
        got = find(store, "STUDY", keyword, value)
        want = expected(rows, keyword, value, True)
        assert sorted(got) == want and want, (keyword, value)
        assert count.take() == 2 * len(want), (keyword, value)
    got = find(store, "PATIENT", "PatientName", "DOE*")
    assert len(got) == len(expected(rows, "PatientName", "DOE*", True)) == count.take()


def test_case_folding_follows_the_listener_option(store):
    """`doe*` finds DOE... with case_insensitive_pn (the default), nothing without it."""
    rows = fill(store, 300)
    assert sorted(find(store, "STUDY", "PatientName", "doe*")) == expected(rows, "PatientName", "DOE*", True)
    assert find(store, "STUDY", "PatientName", "doe*", fold=False) == []
    assert sorted(find(store, "STUDY", "PatientName", "DOE*", fold=False)) == expected(rows, "PatientName", "DOE*",
                                                                                        False)


@pytest.mark.parametrize("fold", [True, False])
def test_narrowing_never_loses_a_match(sqlite_store, fold):
    """Whatever the terms do to case, accents, ligatures and separators, the narrowed answer is
    exactly PS3.4 matching on the clear values (the oracle), for every query shape."""
    rows = fill(sqlite_store, 400)
    more = [("PatientName", "*OE*", "STUDY"), ("PatientName", "*^JOHN", "STUDY"), ("PatientName", "?OE*", "STUDY"),
            ("PatientName", "ıSMAIL*", "STUDY"), ("PatientName", "åström*", "STUDY")]
    for keyword, value, level in QUERIES + more:
        assert sorted(find(sqlite_store, level, keyword, value, fold=fold)) == expected(rows, keyword, value, fold), (
            keyword, value)


def test_findscu_is_answered_from_the_index(engine_factory, tmp_path):
    """A real findscu against a running engine holding a few thousand instances: exact PatientID
    and DOE* answer the right studies and decrypt only those."""
    eng = engine_factory(dicom_yaml())
    port = eng.address("dcm")[1]
    rows = fill(eng.store, 2000)
    count = Decryptions(eng.store)
    for keys, want in (({"PatientID": "PID001234"}, expected(rows, "PatientID", "PID001234", True)),
                       ({"PatientName": "DOE*"}, expected(rows, "PatientName", "DOE*", True)),
                       ({"PatientName": "DOE^JANE", "PatientID": ""}, expected(rows, "PatientName", "DOE^JANE", True))):
        _, res = findscu(port, "STUDY", {**keys, "StudyInstanceUID": ""}, out_dir=tmp_path / "r")
        assert sorted(str(r.StudyInstanceUID) for r in res) == want and want, keys
        assert count.take() == 2 * len(want), keys


def test_retired_ultrasound_image_storage_is_stored_and_found(tmp_path):
    """An ultrasound cart of the 1990s sends Ultrasound Image Storage (Retired), 1.2.840.10008.5.1.4.1.1.6
    (pydicom's color-pl.dcm): accepted at association, stored and found like a current class
    (before: the context was rejected, storescu could not send it)."""
    from tests.conftest import EngineThread

    e = EngineThread(dicom_yaml(), tmp_path)
    try:
        port = e.address("dcm")[1]
        f = data_file("color-pl.dcm")
        ds = dcmread(f, stop_before_pixels=True)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6"
        assert storescu_any(port, [f]) == ["Success"]
        _, res = findscu(port, "IMAGE", {"StudyInstanceUID": ds.StudyInstanceUID,
                                         "SeriesInstanceUID": ds.SeriesInstanceUID,
                                         "SOPInstanceUID": "", "SOPClassUID": ""}, out_dir=tmp_path / "rsp")
        assert [(r.SOPInstanceUID, r.SOPClassUID) for r in res] == [(ds.SOPInstanceUID, ds.SOPClassUID)]
    finally:
        e.stop()


def test_image_level_returns_rows_columns_and_number_of_frames(archive):
    """Rows, Columns and NumberOfFrames are instance keys (and QIDO-RS instance defaults, PS3.18
    Table 10.6.3-5); before, the index kept them nowhere and every answer had them empty."""
    _, ds, _ = archive
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "693_UNCI.dcm"):
        src = ds[name]
        res = q(archive, "IMAGE", {"StudyInstanceUID": src.StudyInstanceUID, "SeriesInstanceUID": src.SeriesInstanceUID,
                                   "SOPInstanceUID": src.SOPInstanceUID, "Rows": "", "Columns": "",
                                   "NumberOfFrames": ""})
        assert len(res) == 1, name
        assert (res[0].Rows, res[0].Columns) == (src.Rows, src.Columns), name
        frames = src.get("NumberOfFrames")
        got = int(res[0].NumberOfFrames) if res[0].NumberOfFrames else None
        assert got == (int(frames) if frames else None), name
