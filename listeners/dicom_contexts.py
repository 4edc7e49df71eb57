"""What the DICOM listener accepts: SOP classes, transfer syntaxes and roles.

One list each, read by the AE setup and by conformance/gen_dicom_statement.py, so
the conformance statement is always the accepted set.
"""

from __future__ import annotations

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom import sop_class as sc

# Storage: kept as received, never transcoded (PS3.5 Section 10 / Annex A).
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
)

# Query/retrieve and worklist identifiers are small: the uncompressed syntaxes only.
QUERY_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
)

# Image storage classes the standard has retired but modalities in service still send (an
# ultrasound cart or a gamma camera of the 1990s; Orthanc and dcm4chee accept them too). Stored,
# indexed and retrieved like any other; pynetdicom's list has only the current classes.
RETIRED_IMAGE_STORAGE: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.12.3",  # X-Ray Angiographic Bi-Plane Image Storage (Retired)
)

STORAGE_SOP_CLASSES: tuple[str, ...] = (*(cx.abstract_syntax for cx in AllStoragePresentationContexts),
                                        *RETIRED_IMAGE_STORAGE)

QR_FIND: tuple[str, ...] = (sc.PatientRootQueryRetrieveInformationModelFind,
                            sc.StudyRootQueryRetrieveInformationModelFind)
QR_MOVE: tuple[str, ...] = (sc.PatientRootQueryRetrieveInformationModelMove,
                            sc.StudyRootQueryRetrieveInformationModelMove)
QR_GET: tuple[str, ...] = (sc.PatientRootQueryRetrieveInformationModelGet,
                           sc.StudyRootQueryRetrieveInformationModelGet)
WORKLIST_FIND: tuple[str, ...] = (sc.ModalityWorklistInformationFind,)
VERIFICATION: tuple[str, ...] = (sc.Verification,)
MPPS: tuple[str, ...] = (sc.ModalityPerformedProcedureStep,)
STORAGE_COMMITMENT: tuple[str, ...] = (sc.StorageCommitmentPushModel,)

PATIENT_ROOT = {QR_FIND[0], QR_MOVE[0], QR_GET[0]}
LEVELS_BY_MODEL = {
    "patient": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    "study": ("STUDY", "SERIES", "IMAGE"),
}


def model_of(abstract_syntax: str) -> str:
    return "patient" if abstract_syntax in PATIENT_ROOT else "study"


def add_contexts(ae: AE, *, query_retrieve: bool, worklist: bool) -> None:
    """Supported contexts of the listener AE.

    Storage contexts accept both roles, so a C-GET SCU that proposes the SCP role
    (SCP/SCU Role Selection, PS3.7 D.3.3.4) receives its sub-operations on the same
    association, and an ordinary C-STORE SCU keeps the default roles.
    """
    for a in VERIFICATION:
        ae.add_supported_context(a, QUERY_TRANSFER_SYNTAXES)
    for a in STORAGE_SOP_CLASSES:
        ae.add_supported_context(a, list(STORAGE_TRANSFER_SYNTAXES), scu_role=True, scp_role=True)
    if query_retrieve:
        for a in (*QR_FIND, *QR_MOVE, *QR_GET):
            ae.add_supported_context(a, QUERY_TRANSFER_SYNTAXES)
    if worklist:
        for a in WORKLIST_FIND:
            ae.add_supported_context(a, QUERY_TRANSFER_SYNTAXES)


def add_workflow_contexts(ae: AE, *, mpps: bool, storage_commitment: bool) -> None:
    """MPPS (we are the SCP of N-CREATE / N-SET) and Storage Commitment Push Model (the SCP of
    N-ACTION, and the sender of N-EVENT-REPORT on the same association, which needs no role
    negotiation: PS3.4 J.3.3)."""
    if mpps:
        for a in MPPS:
            ae.add_supported_context(a, QUERY_TRANSFER_SYNTAXES)
    if storage_commitment:
        for a in STORAGE_COMMITMENT:
            ae.add_supported_context(a, QUERY_TRANSFER_SYNTAXES)
