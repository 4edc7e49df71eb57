"""Storage Commitment Push Model SCP (PS3.4 J.3), pynetdicom as the modality (SCU of N-ACTION and
receiver of the N-EVENT-REPORT), DCMTK storescu storing the images first.

DCMTK 3.6.7 has no storage commitment SCU (storescu and dcmsend do not send N-ACTION), so
pynetdicom plays both the requesting modality and, for results on a new association, the
modality's own SCP that medrelay connects to.
"""

from __future__ import annotations

import threading

import pytest
from dicom_peers import data_file, storescu
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StorageCommitmentPushModel
from sqlalchemy import select, update

from engine.store import schema
from engine.store.dicom import index as idx

INSTANCE = "1.2.840.10008.1.20.1.1"
YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  dcm:
    source:
      type: dicom
      port: 0
      ae_title: MEDRELAY
      calling_aets: [CT01, TESTSCU]
      storage_commitment:
        peers: {{CT01: {{host: 127.0.0.1, port: {peer}}}}}
        retries: 1
        retry_delay: 0.5
    routes: []
"""


class Reports:
    """N-EVENT-REPORTs received (on the requesting association or on one medrelay opens)."""

    def __init__(self) -> None:
        self.got: list[tuple[int, Dataset, str]] = []
        self.ready = threading.Event()

    def handler(self, event):
        self.got.append((event.event_type, event.event_information, str(event.assoc.requestor.ae_title).strip()))
        self.ready.set()
        return 0x0000, None

    def wait(self, timeout: float = 30.0) -> tuple[int, Dataset, str]:
        assert self.ready.wait(timeout), "no N-EVENT-REPORT"
        return self.got[0]


@pytest.fixture
def peer():
    """The modality's own SCP: accepts medrelay's association for the result, with medrelay as SCP."""
    reports = Reports()
    ae = AE(ae_title="CT01")
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    server.reports = reports
    yield server
    server.shutdown()


def ct_files(tmp_path, n):
    out = []
    for i in range(n):
        ds = dcmread(data_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = tmp_path / f"ct{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append((p, ds.SOPInstanceUID))
    return out


def request(refs: list[tuple[str, str]], tx: str | None = None) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = tx or generate_uid()
    items = []
    for cls, uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = Sequence(items)
    return ds


def modality(port: int, reports: Reports | None = None):
    ae = AE(ae_title="CT01")
    ae.add_requested_context(StorageCommitmentPushModel)
    handlers = [(evt.EVT_N_EVENT_REPORT, reports.handler)] if reports is not None else []
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY", evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def audit(eng):
    a = schema.audit_events
    with eng.store.engine.connect() as c:
        return [dict(r) for r in c.execute(select(a).where(a.c.action.like("dicom.commitment%"))
                                           .order_by(a.c.id)).mappings()]


def failed(info: Dataset) -> dict[str, int]:
    return {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in info.get("FailedSOPSequence") or []}


def committed(info: Dataset) -> list[str]:
    return [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence") or []]


@pytest.mark.dcmtk
def test_commitment_on_the_same_association_lists_failures_with_reasons(engine_factory, peer, tmp_path):
    eng = engine_factory(YAML.format(peer=peer.server_address[1]))
    port = eng.address("dcm")[1]
    files = ct_files(tmp_path, 3)
    r = storescu(port, [p for p, _ in files], aet="TESTSCU")
    assert r.returncode == 0, r.stdout
    (_, ok1), (_, ok2), (_, broken) = files
    # the third is indexed but its stored bytes no longer open (damaged at rest): not promised
    with eng.store.engine.begin() as c:
        row = idx.existing_instance(c, broken)
        blob_id = c.execute(select(schema.messages.c.blob_id).where(schema.messages.c.id == row["message_id"])).scalar()
        data = bytearray(c.execute(select(schema.blobs.c.data).where(schema.blobs.c.id == blob_id)).scalar())
        data[-1] ^= 0xFF
        c.execute(update(schema.blobs).where(schema.blobs.c.id == blob_id).values(data=bytes(data)))
    unknown = generate_uid()
    reports = Reports()
    assoc = modality(port, reports)
    try:
        tx = generate_uid()
        status, _ = assoc.send_n_action(request([(CTImageStorage, ok1), (CTImageStorage, ok2), (CTImageStorage,
                                                 unknown), (MRImageStorage, ok2), (CTImageStorage, broken)], tx),
                                        1, StorageCommitmentPushModel, INSTANCE)
        assert status.Status == 0x0000
        event_type, info, sender = reports.wait()
    finally:
        assoc.release()
    assert event_type == 2 and sender == "CT01"  # on the modality's own association (requestor: CT01)
    assert info.TransactionUID == tx and info.RetrieveAETitle == "MEDRELAY"
    assert committed(info) == [ok1, ok2]
    assert failed(info) == {unknown: 0x0112, ok2: 0x0119, broken: 0x0110}
    got = eng.wait_for(lambda: audit(eng) if len(audit(eng)) == 2 else None)
    assert peer.reports.got == []  # nothing on a new association
    assert [(a["action"], a["outcome"]) for a in got] == [("dicom.commitment.request", "success"),
                                                          ("dicom.commitment.report", "success")]
    assert got[1]["entity"]["committed"] == 2 and got[1]["entity"]["failed"] == 3
    assert got[1]["entity"]["delivered"] == "same_association"


@pytest.mark.dcmtk
def test_commitment_after_release_goes_to_the_configured_ae_with_the_scp_role(engine_factory, peer, tmp_path):
    eng = engine_factory(YAML.format(peer=peer.server_address[1]))
    port = eng.address("dcm")[1]
    files = ct_files(tmp_path, 2)
    assert storescu(port, [p for p, _ in files]).returncode == 0
    assoc = modality(port)
    tx = generate_uid()
    status, _ = assoc.send_n_action(request([(CTImageStorage, u) for _, u in files], tx), 1,
                                    StorageCommitmentPushModel, INSTANCE)
    assoc.release()  # a modality that does not wait: the result must come on a new association
    assert status.Status == 0x0000
    event_type, info, sender = peer.reports.wait()
    assert event_type == 1 and sender == "MEDRELAY" and info.TransactionUID == tx
    assert sorted(committed(info)) == sorted(u for _, u in files) and "FailedSOPSequence" not in info
    report = eng.wait_for(lambda: [a for a in audit(eng) if a["action"] == "dicom.commitment.report"])
    assert report[0]["entity"]["delivered"] == "new_association"


def test_commitment_requests_that_are_refused(engine_factory, peer):
    eng = engine_factory(YAML.format(peer=peer.server_address[1]))
    port = eng.address("dcm")[1]
    assoc = modality(port)
    try:
        st, _ = assoc.send_n_action(request([(CTImageStorage, generate_uid())]), 2, StorageCommitmentPushModel,
                                    INSTANCE)
        assert st.Status == 0x0123  # no such action
        no_tx = request([(CTImageStorage, generate_uid())])
        del no_tx.TransactionUID
        st, _ = assoc.send_n_action(no_tx, 1, StorageCommitmentPushModel, INSTANCE)
        assert st.Status == 0x0120
        bad = request([(CTImageStorage, "1.2.abc")])
        st, _ = assoc.send_n_action(bad, 1, StorageCommitmentPushModel, INSTANCE)
        assert st.Status == 0x0106
        assert assoc.is_established  # refusals leave the association as it was
    finally:
        assoc.release()
    got = audit(eng)
    assert [(a["action"], a["outcome"]) for a in got] == [("dicom.commitment.request", "failure")] * 3


def test_commitment_result_without_a_peer_is_audited_undelivered(engine_factory, peer, tmp_path):
    eng = engine_factory(YAML.format(peer=peer.server_address[1]).replace("[CT01, TESTSCU]", "[CT02, TESTSCU]"))
    port = eng.address("dcm")[1]
    ae = AE(ae_title="CT02")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    st, _ = assoc.send_n_action(request([(CTImageStorage, generate_uid())]), 1, StorageCommitmentPushModel, INSTANCE)
    assoc.release()
    assert st.Status == 0x0000
    report = eng.wait_for(lambda: [a for a in audit(eng) if a["action"] == "dicom.commitment.report"])
    assert report[0]["outcome"] == "failure" and report[0]["entity"]["delivered"] == "undelivered"
    assert peer.reports.got == []
