"""Sources: the components that receive messages from peers (MLLP, DICOM, FHIR REST).

A listener turns a peer's bytes into an Envelope, submits it to intake, and answers the peer
from the Outcome only (after commit). One module per protocol and layer (``dicom_ul`` the
Upper Layer, ``dicom_dimse`` the command sets, ``dicom_store`` / ``dicom_qr`` the services,
``fhir_app`` the REST interactions). Nothing imports listeners.
"""
