"""A peer that connects while the DICOM listener starts is served like any other.

The listener's accept loop runs from the moment its socket listens. The test connects a real
pynetdicom SCU in exactly that instant (right after ``_serve`` has started the loop, before
``start()`` returns): before the fix, the connection's thread found no server on the listener
and closed the connection unanswered (seen as a flaky "expected A-ASSOCIATE-AC, got b''" in
test_dicom_stream_in, whose raw client connects right after the port opens).
"""

from __future__ import annotations

from dicom_peers import dicom_yaml
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from listeners import dicom as dicom_listener
from tests.dicom_peers import data_file


def test_associations_in_the_instant_the_listener_starts_are_served(engine_factory, monkeypatch):
    seen: list[object] = []
    real = dicom_listener.DicomListener._serve
    ct = dcmread(data_file("CT_small.dcm"))

    def serve_then_connect(self, address, ssl_ctx):
        server = real(self, address, ssl_ctx)
        port = server.server_address[1]
        # start() has not returned yet: one pynetdicom association (C-ECHO), one plain storage
        # association (our Upper Layer takes it)
        for context, call in ((Verification, lambda a: a.send_c_echo()), (CTImageStorage,
                                                                         lambda a: a.send_c_store(ct))):
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(context, str(ct.file_meta.TransferSyntaxUID))
            assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
            seen.append(assoc.is_established)
            if assoc.is_established:
                seen.append(call(assoc).Status)
                assoc.release()
        return server

    monkeypatch.setattr(dicom_listener.DicomListener, "_serve", serve_then_connect)
    e = engine_factory(dicom_yaml())
    assert seen == [True, 0x0000, True, 0x0000]
    assert e.address("dcm")[1] > 0
