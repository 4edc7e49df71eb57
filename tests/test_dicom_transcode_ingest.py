"""`dicom_transcode` on a route (issue 13 item 2, ingest transcoding), against DCMTK peers.

storescu sends uncompressed CT and MR test files; the archive route with the transform files
JPEG 2000 lossless (the index says so), getscu proposing J2K lossless and WADO-RS as stored
get J2K back, and the pixel data decodes equal to the original. A route that decompresses
for an old peer delivers Explicit VR Little Endian to a storescp that would take anything.
An instance the codec refuses dead-letters with the reason (on_failure: error) or is archived
as received with an audit row (on_failure: keep). A lossy target without lossy_ratio is a
configuration error naming the line and the field path.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from conftest import EngineThread
from dicom_peers import StoreSCP, run, storescu, storescu_any
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from sqlalchemy import select

from engine.config import ConfigError, parse_settings
from engine.envelope import Envelope
from engine.store import schema
from engine.store.dicom import tables as dt

pytestmark = pytest.mark.dcmtk

J2KR = "1.2.840.10008.1.2.4.90"
ELE = "1.2.840.10008.1.2.1"
TOKEN = "transcode-ingest-token-0123456789"


def fresh(tmp, name: str, **change):
    """A pydicom test file with new UIDs, saved to ``tmp``; (path, dataset)."""
    tmp.mkdir(parents=True, exist_ok=True)
    ds = dcmread(get_testdata_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for k, v in change.items():
        setattr(ds, k, v)
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def channel(name: str, transform: str, to: str = "{type: store}") -> str:
    return f"""
  {name}:
    source: {{type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [TESTSCU, GETSCU]}}
    routes:
      - name: archive
        transforms: [{transform}]
        to: {to}
"""


def yaml(*channels: str, store_url: str = "sqlite:///data/medrelay.db") -> str:
    return (f'store: {{url: "{store_url}", blobs: data/blobs}}' + """
keys: {kek_file: data/keys.json}
channels:
  web:
    source: {type: dicomweb, host: 127.0.0.1, port: 0, base_path: /dicom-web,
             auth: {bearer_tokens: ["${DW_TOKEN}"]}}
    routes: []
""" + "".join(channels))


def settled(store, n: int):
    """The deliveries once ``n`` of them are no longer pending, else None."""
    d = schema.deliveries
    with store.engine.connect() as c:
        rows = c.execute(select(d.c.channel, d.c.state, d.c.last_error).order_by(d.c.id)).all()
    return rows if len(rows) >= n and all(r.state != "pending" for r in rows) else None


def indexed_syntax(store, sop_uid: str) -> str:
    i = dt.instances
    with store.engine.connect() as c:
        return c.execute(select(i.c.transfer_syntax).where(i.c.sop_uid == sop_uid)).scalar_one()


def cget_j2k_only(port: int, sop_uids: list[str]) -> list:
    """C-GET at IMAGE level by a pynetdicom SCU whose storage contexts offer JPEG 2000 lossless
    only; the data sets received (in the syntax of their context)."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StudyRootQueryRetrieveInformationModelGet

    received = []

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop, [J2KR])
    roles = [build_role(sop, scp_role=True) for sop in (CTImageStorage, MRImageStorage)]
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel, q.SOPInstanceUID = "IMAGE", sop_uids
    statuses = [s.Status for s, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert len(received) == len(sop_uids)
    return received


def audits(store, action: str) -> list:
    a = schema.audit_events
    with store.engine.connect() as c:
        return c.execute(select(a.c.outcome, a.c.channel, a.c.entity, a.c.detail)
                         .where(a.c.action == action)).all()


@pytest.fixture
def engine(tmp_path):
    made: list[EngineThread] = []

    def make(text: str) -> EngineThread:
        d = tmp_path / f"e{len(made)}"
        d.mkdir()
        made.append(EngineThread(text, d, env={"DW_TOKEN": TOKEN}))
        return made[-1]

    yield make
    for e in made:
        e.stop()


def test_archive_route_stores_j2k_lossless_served_by_cget_and_wado(engine, tmp_path, store_url):
    e = engine(yaml(channel("dcm", f"{{type: dicom_transcode, transfer_syntax: {J2KR}}}"), store_url=store_url))
    port = e.address("dcm")[1]
    sent = dict(fresh(tmp_path / "in", n) for n in ("CT_small.dcm", "MR_small.dcm"))
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in sent.values()} == {ELE}  # uncompressed in
    r = storescu(port, list(sent))
    assert r.stdout.count("Received Store Response (Success)") == 2, r.stdout
    rows = e.wait_for(lambda: settled(e.store, 2), timeout=60)
    assert [r.state for r in rows] == ["done", "done"], rows
    for ds in sent.values():
        assert indexed_syntax(e.store, str(ds.SOPInstanceUID)) == J2KR

    by_uid = {str(ds.SOPInstanceUID): ds for ds in sent.values()}
    for ds in cget_j2k_only(port, list(by_uid)):  # pynetdicom SCU taking JPEG 2000 lossless only
        assert str(ds.file_meta.TransferSyntaxUID) == J2KR
        assert np.array_equal(ds.pixel_array, by_uid[str(ds.SOPInstanceUID)].pixel_array)
        assert ds.get("LossyImageCompression", "00") == "00"  # lossless: the same instance, unmarked

    # DCMTK getscu proposing J2K lossless and uncompressed: the listener prefers uncompressed
    # (its context order), so the archived J2K is decoded on the way out, pixel for pixel
    out = tmp_path / "got"
    out.mkdir()
    studies = "\\".join(str(ds.StudyInstanceUID) for ds in sent.values())
    g = run("getscu", "-v", "-S", "+xv", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies}", "127.0.0.1", str(port))
    assert g.returncode == 0, g.stdout
    got = [dcmread(p) for p in sorted(out.iterdir())]
    assert {str(ds.SOPInstanceUID) for ds in got} == set(by_uid)
    for ds in got:
        assert np.array_equal(ds.pixel_array, by_uid[str(ds.SOPInstanceUID)].pixel_array)

    host, wport = e.address("web")
    for uid, original in by_uid.items():
        url = (f"http://{host}:{wport}/dicom-web/studies/{original.StudyInstanceUID}/series/"
               f"{original.SeriesInstanceUID}/instances/{uid}")
        resp = httpx.get(url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}",
                                                   "Accept": 'multipart/related; type="application/dicom"; '
                                                             'transfer-syntax=*'})
        assert resp.status_code == 200, resp.text[:300]
        assert f"transfer-syntax={J2KR}" in resp.text[:400]
        body = resp.content
        part = body[body.index(b"\r\n\r\n") + 4:body.rindex(b"\r\n--")]
        ds = dcmread(io.BytesIO(part))
        assert str(ds.file_meta.TransferSyntaxUID) == J2KR
        assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_decompressing_route_delivers_explicit_vr_to_a_peer_that_takes_anything(engine, tmp_path):
    scp = StoreSCP(tmp_path / "scp", extra=("+xa",))  # accepts every syntax: only the transform decides
    try:
        to = f"{{type: dicom, host: 127.0.0.1, port: {scp.port}, called_ae_title: STORESCP}}"
        e = engine(yaml(channel("dcm", f"{{type: dicom_transcode, transfer_syntax: {ELE}}}", to)))
        path, original = fresh(tmp_path / "in", "emri_small_jpeg_2k_lossless.dcm")
        assert storescu_any(e.address("dcm")[1], [path]) == ["Success"]
        rows = e.wait_for(lambda: settled(e.store, 1), timeout=60)
        assert [r.state for r in rows] == ["done"], rows
        (received,) = scp.files()
        ds = dcmread(received)
        assert str(ds.file_meta.TransferSyntaxUID) == ELE and ds.SOPInstanceUID == original.SOPInstanceUID
        assert np.array_equal(ds.pixel_array, original.pixel_array)
    finally:
        scp.stop()


def test_instance_that_cannot_be_converted_dead_letters_or_is_kept(engine, tmp_path):
    transform = "{{type: dicom_transcode, transfer_syntax: {ts}, on_failure: {mode}}}"
    e = engine(yaml(channel("strict", transform.format(ts=ELE, mode="error")),
                    channel("lenient", transform.format(ts=ELE, mode="keep"))))
    bad_pixels = encapsulate([b"\xff\xd8\xff\xe0 not a JPEG stream \xff\xd9" * 4])
    for i, name in enumerate(("strict", "lenient")):
        path, _ds = fresh(tmp_path / name, "SC_rgb_jpeg_dcmtk.dcm", PixelData=bad_pixels)
        assert storescu_any(e.address(name)[1], [path]) == ["Success"]  # intake takes it as received
        rows = e.wait_for(lambda n=i + 1: settled(e.store, n), timeout=60)
    by_channel = {r.channel: r for r in rows}
    strict, lenient = by_channel["strict"], by_channel["lenient"]
    assert strict.state == "dead" and "TranscodeError" in strict.last_error, strict
    assert "JPEG Baseline" in strict.last_error and "failed" in strict.last_error  # the reason
    dead = audits(e.store, "delivery.dead_letter")
    assert [(d.channel, "TranscodeError" in d.detail) for d in dead] == [("strict", True)]
    assert lenient.state == "done", lenient
    kept = audits(e.store, "dicom.transcode")
    assert [(k.outcome, k.channel, k.entity["kept"]) for k in kept] == [("failure", "lenient", True)]
    assert "JPEG Baseline" in kept[0].detail


def test_lossy_target_needs_lossy_ratio_config_error_with_line_and_path(tmp_path):
    text = yaml(channel("dcm", "{type: dicom_transcode, transfer_syntax: 1.2.840.10008.1.2.4.91}"))
    with pytest.raises(ConfigError) as err:
        parse_settings(text, tmp_path / "channels.yaml", env={"DW_TOKEN": TOKEN})
    message = str(err.value)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "dicom_transcode" in t)
    assert f"channels.yaml:{line}" in message, message
    assert "channels.dcm.routes[0].transforms[0].transfer_syntax" in message, message
    assert "lossy_ratio" in message
    with pytest.raises(ConfigError, match=r"transforms\[0\]\.transfer_syntax.*cannot encode|can encode"):
        parse_settings(text.replace("1.2.840.10008.1.2.4.91", "1.2.3.4"), tmp_path / "channels.yaml",
                       env={"DW_TOKEN": TOKEN})
    parse_settings(text.replace("transfer_syntax:", "lossy_ratio: 10, transfer_syntax:"),
                   tmp_path / "channels.yaml", env={"DW_TOKEN": TOKEN})


def test_lossy_with_ratio_is_a_new_marked_instance_and_non_images_pass_unchanged(tmp_path):
    from transforms.dicom_transcode import DicomTranscodeConfig, build

    path, original = fresh(tmp_path, "CT_small.dcm")
    cfg = DicomTranscodeConfig(type="dicom_transcode", transfer_syntax="1.2.840.10008.1.2.4.91", lossy_ratio=10)
    env = Envelope(channel="c", kind="dicom", payload=path.read_bytes(),
                   headers={"SOPInstanceUID": str(original.SOPInstanceUID)})
    out = build(cfg)(env)
    ds = dcmread(io.BytesIO(out.payload))
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.91"
    assert ds.SOPInstanceUID != original.SOPInstanceUID  # a different image (PS3.3 C.7.6.1.1.5)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == out.headers["SOPInstanceUID"]
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_15444_1"
    assert out.headers["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.91" and out.lineage == (env.id,)
    assert ds.pixel_array.shape == original.pixel_array.shape

    deflated = dcmread(get_testdata_file("CT_small.dcm"))
    deflated.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    buf = io.BytesIO()
    deflated.save_as(buf, enforce_file_format=True)
    out = build(DicomTranscodeConfig(type="dicom_transcode", transfer_syntax=J2KR))(
        Envelope(channel="c", kind="dicom", payload=buf.getvalue()))
    ds = dcmread(io.BytesIO(out.payload))
    assert str(ds.file_meta.TransferSyntaxUID) == J2KR and np.array_equal(ds.pixel_array, deflated.pixel_array)

    sr = dcmread(get_testdata_file("CT_small.dcm"))
    del sr.PixelData
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    same = Envelope(channel="c", kind="dicom", payload=buf.getvalue())
    j2k = DicomTranscodeConfig(type="dicom_transcode", transfer_syntax=J2KR)
    assert build(j2k)(same) is same  # no Pixel Data: not relabelled, kept as received


def test_instance_over_max_instance_bytes_is_a_failure_by_on_failure(tmp_path):
    from transforms import dicom_codec
    from transforms.dicom_transcode import DicomTranscodeConfig, build

    path, _ds = fresh(tmp_path, "CT_small.dcm")
    env = Envelope(channel="c", kind="dicom", payload=path.read_bytes())
    strict = DicomTranscodeConfig(type="dicom_transcode", transfer_syntax=J2KR, max_instance_bytes=1000)
    with pytest.raises(dicom_codec.TranscodeError, match="larger than max_instance_bytes"):
        build(strict)(env)
    kept = build(strict.model_copy(update={"on_failure": "keep"}))(env)
    assert kept is env  # passed on as received (no context here, so no audit row)
