"""DICOM over TLS (PS3.15 B.1 / BCP 195): DCMTK storescu +tls and a pynetdicom SCU as peers,
the DICOM route sending to a TLS Storage SCP, mutual TLS refusing anonymous clients."""

from __future__ import annotations

import ssl
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select
from tls_certs import make_pki, s_client_handshake

from engine.store import schema
from tests.dicom_peers import data_file, run, store_statuses

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def yaml(pki, *, mutual: bool, routes: str = "[]") -> str:
    return f"""
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  dcm:
    source:
      type: dicom
      port: 0
      ae_title: MEDRELAY
      calling_aets: [TESTSCU, PYSCU]
      tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}", ca: "{pki.ca}",
             require_client_cert: {str(mutual).lower()}}}
    routes: {routes}
"""


def ct_file(tmp: Path) -> tuple[Path, str]:
    ds = dcmread(data_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out, str(ds.SOPInstanceUID)


def n_messages(e) -> int:
    with e.store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(schema.messages)).scalar_one()


def storescu_tls(port: int, files: list[Path], *tls: str) -> str:
    r = run("storescu", "-v", "-aet", "TESTSCU", "-aec", "MEDRELAY", *tls, "127.0.0.1", str(port),
            *[str(f) for f in files], timeout=60)
    return (r.stdout or "") + (r.stderr or "")


def test_dcmtk_storescu_over_tls(engine_factory, pki, tmp_path):
    e = engine_factory(yaml(pki, mutual=False))
    port = e.address("dcm")[1]
    f, _ = ct_file(tmp_path)
    out = storescu_tls(port, [f], "+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca))
    assert store_statuses(out) == ["Success"], out
    assert n_messages(e) == 1
    plain = run("storescu", "-aet", "TESTSCU", "-aec", "MEDRELAY", "127.0.0.1", str(port), str(f), timeout=30)
    assert plain.returncode != 0  # a plain-TCP association to the TLS port fails
    ok, text = s_client_handshake(port, pki, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert not ok and "Cipher is (NONE)" in text


def test_mutual_tls_refuses_storescu_without_certificate(engine_factory, pki, tmp_path):
    e = engine_factory(yaml(pki, mutual=True))
    port = e.address("dcm")[1]
    f, _ = ct_file(tmp_path)
    out = storescu_tls(port, [f], "+tla", "+cf", str(pki.ca))  # anonymous TLS: no client certificate
    assert "Success" not in store_statuses(out), out
    assert n_messages(e) == 0
    out = storescu_tls(port, [f], "+tls", str(pki.rogue_client.key), str(pki.rogue_client.cert), "+cf", str(pki.ca))
    assert "Success" not in store_statuses(out), out
    assert n_messages(e) == 0
    out = storescu_tls(port, [f], "+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca))
    assert store_statuses(out) == ["Success"], out
    assert len(tls_rejections(e)) >= 2  # the anonymous and the rogue client, audited


def tls_rejections(e) -> list[str]:
    with e.store.engine.connect() as c:
        return list(c.execute(select(schema.audit_events.c.detail)
                              .where(schema.audit_events.c.action == "dicom.tls_rejected")).scalars())


def test_plain_dicom_to_a_tls_port_is_audited_and_the_listener_lives(engine_factory, pki, tmp_path):
    """A peer speaking plain DICOM to the TLS port fails the handshake in its own thread (audited,
    Security Alert), a silent connection does not hold up the next one, and TLS peers still work."""
    import socket

    e = engine_factory(yaml(pki, mutual=False))
    port = e.address("dcm")[1]
    silent = socket.create_connection(("127.0.0.1", port))  # never says hello
    assert "Association Accepted" not in run("echoscu", "-v", "-aet", "TESTSCU", "-aec", "MEDRELAY",
                                             "127.0.0.1", str(port), timeout=60).stdout
    e.wait_for(lambda: tls_rejections(e), timeout=30)
    assert "TLS handshake failed" in tls_rejections(e)[0]
    f, _ = ct_file(tmp_path)
    out = storescu_tls(port, [f], "+tla", "+cf", str(pki.ca))
    assert store_statuses(out) == ["Success"], out
    silent.close()


def test_pynetdicom_scu_with_ssl_context(engine_factory, pki):
    e = engine_factory(yaml(pki, mutual=True))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", e.address("dcm")[1], ae_title="MEDRELAY", tls_args=(ctx, "localhost"))
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    bare = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))  # no client cert
    assoc = ae.associate("127.0.0.1", e.address("dcm")[1], ae_title="MEDRELAY", tls_args=(bare, "localhost"))
    assert not assoc.is_established


class TLSStoreSCP:
    """A PACS behind mutual TLS (pynetdicom with ssl_context): records the SOP Instance UIDs it gets."""

    def __init__(self, pki) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server.cert, pki.server.key)
        ctx.load_verify_locations(pki.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.got: list[str] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])

        def on_store(event):
            with self.lock:
                self.got.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ctx,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
        self.port = self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()


def test_dicom_route_sends_over_mutual_tls(engine_factory, pki, tmp_path):
    pacs = TLSStoreSCP(pki)
    try:
        routes = f"""
      - name: pacs
        to:
          type: dicom
          host: 127.0.0.1
          port: {pacs.port}
          called_ae_title: PACS
          tls: {{ca: "{pki.ca}", cert: "{pki.client.cert}", key: "{pki.client.key}", server_name: localhost}}
        retry: {{max_attempts: 20, initial_delay: 0.1, max_delay: 0.5}}"""
        e = engine_factory(yaml(pki, mutual=False, routes=routes))
        f, uid = ct_file(tmp_path)
        out = storescu_tls(e.address("dcm")[1], [f], "+tls", str(pki.client.key), str(pki.client.cert),
                           "+cf", str(pki.ca))
        assert store_statuses(out) == ["Success"], out
        e.wait_for(lambda: pacs.got == [uid], timeout=30)
    finally:
        pacs.stop()
