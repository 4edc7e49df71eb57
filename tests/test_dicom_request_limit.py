"""The data set of a request that is not a C-STORE is bounded (listeners/dicom_provider.py).

pynetdicom's DIMSE layer collects an N-CREATE / N-SET / N-ACTION attribute list or a C-FIND
identifier whole in memory; a peer that sends data set fragments and never the last one grew
the engine without end (400 MB sent: RSS +400 MB, found by the issue 12 probe). Past
``MAX_REQUEST_DATA`` the association gets A-ABORT; the listener serves the next peer, a small
MPPS N-CREATE is taken and a C-STORE larger than the limit on the same kind of association is not
cut. The limit is lowered for the test so that a few MiB cross it.
"""

from __future__ import annotations

import socket
import struct
import time
from io import BytesIO

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import N_CREATE_RQ
from pynetdicom.dimse_primitives import N_CREATE
from pynetdicom.sop_class import CTImageStorage, ModalityPerformedProcedureStep, Verification
from test_dicom_mpps import step

from listeners import dicom_provider

YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  modalities:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [CT01]}
    routes:
      - name: archive
        to: {type: store}
"""
LIMIT = 1024 * 1024


@pytest.fixture
def port(engine_factory, monkeypatch):
    monkeypatch.setattr(dicom_provider, "MAX_REQUEST_DATA", LIMIT)
    return engine_factory(YAML).address("modalities")[1]


def _pdv(cx: int, control: int, data: bytes) -> bytes:
    body = struct.pack(">IB", len(data) + 2, cx) + bytes((control,)) + data
    return struct.pack(">BBI", 4, 0, len(body)) + body


def _image(size: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "LIMIT1"
    ds.Modality = "CT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1024, size // 2048, 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = b"\x01\x02" * (ds.Rows * ds.Columns)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_endless_request_data_set_is_aborted_and_others_are_served(port):
    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    cx = assoc.accepted_contexts[0].context_id
    p = N_CREATE()
    p.MessageID = 1
    p.AffectedSOPClassUID = ModalityPerformedProcedureStep
    p.AffectedSOPInstanceUID = generate_uid()
    p.AttributeList = BytesIO(b"\x08\x00\x05\x00\x00\x00\x00\x00")
    msg = N_CREATE_RQ()
    msg.primitive_to_message(p)
    sock: socket.socket = assoc.dul.socket.socket
    for pdata in msg.encode_msg(cx, 16384):
        for ctx, val in pdata.presentation_data_value_list:
            if val[0] & 0x01:
                sock.sendall(_pdv(ctx, val[0], val[1:]))
    sent = 0
    try:
        while sent < 8 * LIMIT:  # data set fragments, never the last
            sock.sendall(_pdv(cx, 0x00, b"\x00" * 65536))
            sent += 65536
    except OSError:
        pass
    deadline = time.monotonic() + 30
    while not assoc.is_aborted and time.monotonic() < deadline:  # pynetdicom read our A-ABORT
        time.sleep(0.05)
    assert assoc.is_aborted, sent
    assert sent < 8 * LIMIT

    ae = AE(ae_title="CT01")
    ae.add_requested_context(Verification)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ok = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert ok.is_established
    try:
        assert ok.send_c_echo().Status == 0x0000
        status, _ = ok.send_n_create(step(), ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0000
        big = _image(3 * LIMIT)  # a C-STORE is not a request data set: not limited here
        assert ok.send_c_store(big).Status == 0x0000
    finally:
        ok.release()


def test_mpps_n_get_is_unrecognized_operation(port):
    """N-GET is not served (optional for the MPPS SCP): 0x0211, and the association serves on."""
    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_get([0x00400252], ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0211
        status, _ = assoc.send_n_create(step(), ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0000
    finally:
        assoc.release()
