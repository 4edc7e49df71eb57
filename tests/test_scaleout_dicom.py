"""Issue 10 item 1, last line: on several engines sharing one PostgreSQL store and one blob
folder, C-FIND, C-MOVE, C-GET, the Modality Worklist and DICOMweb at any engine see everything
any engine stored.

Two engines (Runtimes in this process, each with its own Store, connections and listeners, as two
hosts would have them). What engine A takes in, from real peers (DCMTK storescu, an MLLP client),
is asked for at engine B with real peers too: findscu, getscu, movescu to DCMTK storescp,
findscu -W, and dicomweb-client for QIDO-RS and WADO-RS. The data sets B hands out are compared
with the originals.
"""

from __future__ import annotations

from pathlib import Path

import hl7.client
import pytest
from dicom_peers import StoreSCP, data_file, findscu, run, store_statuses, storescu, tool
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from test_scaleout import _yaml, pg  # noqa: F401  (pg: the fixture, a fresh PostgreSQL database)

from engine.store.dicom.worklist import find_worklist

GOLDEN = Path(__file__).resolve().parent.parent / "conformance" / "golden" / "hl7"
TOKEN = "scaleout-dicom-token-0123456789abcdef"

pytestmark = pytest.mark.dcmtk


def _instances(tmp: Path) -> list[Path]:
    """CT_small and MR_small under new UIDs (a study each), so nothing is shared with other tests."""
    out = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = dcmread(data_file(name))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        p = tmp / name
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def test_what_one_engine_stored_is_found_and_retrieved_at_another(engine_factory, pg, tmp_path):  # noqa: F811
    tool("storescu")
    url, shared = pg
    scp = StoreSCP(tmp_path / "moved")
    cfg = _yaml(url, shared, f"""
        dcm:
          source:
            type: dicom
            port: 0
            ae_title: MEDRELAY
            calling_aets: [TESTSCU, GETSCU, CT01]
            move_destinations: {{STORESCP: {{host: 127.0.0.1, port: {scp.port}}}}}
          routes:
            - {{name: archive, to: {{type: store}}}}
        orders:
          source: {{type: mllp, port: 0}}
          routes:
            - name: mwl
              transforms: [{{type: hl7_to_worklist, station_ae_titles: {{CT: CT01, MR: MR01}}}}]
              to: {{type: store}}
        web:
          source: {{type: dicomweb, host: 127.0.0.1, port: 0, base_path: /dicom-web,
                   auth: {{bearer_tokens: ["${{DW_TOKEN}}"]}}}}
          routes:
            - {{name: archive, to: {{type: store}}}}
        """)
    env = {"DW_TOKEN": TOKEN}
    a, b = engine_factory(cfg, env=env), engine_factory(cfg, env=env)
    try:
        files = _instances(tmp_path)
        originals = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
        r = storescu(a.address("dcm")[1], files)
        assert store_statuses((r.stdout or "") + (r.stderr or "")) == ["Success"] * len(files)
        with hl7.client.MLLPClient(*a.address("orders")) as c:
            msg = (GOLDEN / "omi_o23_new_251.hl7").read_bytes().replace(b"\n", b"\r").strip()
            assert b"MSA|AA|" in c.send_message(msg)

        port_b = b.address("dcm")[1]
        studies = sorted({str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files})
        # C-FIND at B: both studies, with the instance counts A stored
        _, found = findscu(port_b, "STUDY", {"StudyInstanceUID": "\\".join(studies),
                                             "NumberOfStudyRelatedInstances": ""}, out_dir=tmp_path / "rsp")
        assert sorted(str(d.StudyInstanceUID) for d in found) == studies
        assert {int(d.NumberOfStudyRelatedInstances) for d in found} == {1}

        # C-GET at B (DCMTK getscu): the data sets A received, byte for byte
        got_dir = tmp_path / "got"
        got_dir.mkdir()
        for study in studies:
            g = run("getscu", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "+B", "-od", str(got_dir),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port_b))
            assert g.returncode == 0, g.stdout
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in got_dir.iterdir()}
        assert set(got) == set(originals)
        for uid, p in got.items():
            _same(p, originals[uid])

        # C-MOVE at B to DCMTK storescp
        mv = run("movescu", "-S", "-aet", "TESTSCU", "-aec", "MEDRELAY", "-aem", "STORESCP",
                 "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=" + "\\".join(studies),
                 "127.0.0.1", str(port_b))
        assert mv.returncode == 0, mv.stdout
        moved = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.files()}
        assert set(moved) == set(originals)
        for uid, p in moved.items():
            _same(p, originals[uid])

        # DICOMweb at B (dicomweb-client): QIDO-RS finds them, WADO-RS gives the same data sets
        host, wport = b.address("web")
        client = DICOMwebClient(url=f"http://{host}:{wport}/dicom-web", headers={"Authorization": f"Bearer {TOKEN}"})
        for uid, f in originals.items():
            hits = client.search_for_instances(search_filters={"SOPInstanceUID": uid})
            assert len(hits) == 1, uid
            ds = dcmread(f)
            back = client.retrieve_instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), uid)
            assert back.PixelData == ds.PixelData and back.PatientID == ds.PatientID

        # Modality Worklist at B: the order A took over MLLP (its delivery ran in either engine)
        b.wait_for(lambda: find_worklist(b.store, _mwl_query()) or None, timeout=30)
        out = tmp_path / "mwl"
        out.mkdir()
        w = run("findscu", "-W", "-aet", "CT01", "-aec", "MEDRELAY", "-X", "-od", str(out),
                "-k", "PatientName", "-k", "AccessionNumber",
                "-k", "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT01", "127.0.0.1", str(port_b))
        assert w.returncode == 0, w.stdout
        items = [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
        assert [str(i.AccessionNumber) for i in items] == ["ACC100"]
    finally:
        scp.stop()


def _same(got: Path, original: Path) -> None:
    """The data set B sent is the one A received: every element of the original, with its value
    (storescu may send another transfer syntax than the file's, so not byte for byte)."""
    ours, theirs = dcmread(got), dcmread(original)
    for elem in theirs:
        if elem.tag.element != 0 and elem.tag != 0xFFFCFFFC:  # group lengths, trailing padding
            assert ours[elem.tag].value == elem.value, (original.name, elem.tag)


def _mwl_query():
    from pydicom import Dataset
    from pydicom.sequence import Sequence

    ds = Dataset()
    ds.AccessionNumber = ""
    sps = Dataset()
    sps.ScheduledStationAETitle = ""
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    return ds
