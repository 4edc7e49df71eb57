"""Query/Retrieve SCU: C-FIND, C-MOVE and C-GET against a remote archive (PS3.4 C.4).

Every call opens its own association, sends one request, collects the answers and releases, so a
caller never holds an association across its own work. Failures are ``QRError`` with a reason fit
for a log line or an operator (association rejected or unreachable, a failure status); nothing
here logs PHI: identifiers go to the peer, counts and UIDs come back.

C-GET receives its instances on the association it opened: every storage SOP class pynetdicom
knows (120, so the request stays within PS3.8's 128 presentation contexts) is proposed with the
common transfer syntaxes and the SCP role (SCP/SCU Role Selection, PS3.7 D.3.3.4), and each
received data set is handed to ``on_instance`` (its Part-10 bytes), whose answer is the C-STORE
status the peer gets.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom import sop_class as sc

Model = Literal["study", "patient"]
FIND = {"study": sc.StudyRootQueryRetrieveInformationModelFind,
        "patient": sc.PatientRootQueryRetrieveInformationModelFind}
MOVE = {"study": sc.StudyRootQueryRetrieveInformationModelMove,
        "patient": sc.PatientRootQueryRetrieveInformationModelMove}
GET = {"study": sc.StudyRootQueryRetrieveInformationModelGet,
       "patient": sc.PatientRootQueryRetrieveInformationModelGet}
QUERY_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
GET_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
                JPEG2000Lossless, JPEG2000, RLELossless]
MAX_MATCHES = 10000  # C-FIND answers kept at most; the rest are read and dropped


class QRError(Exception):
    """The operation failed: no association, or the peer's failure status."""


class NoAssociation(QRError):
    """The remote could not be reached, or refused the association."""


@dataclass(frozen=True)
class Remote:
    """The archive asked: its AE title and address (TLS from the engine's TLS settings)."""

    ae_title: str
    host: str
    port: int
    tls: Any = None  # engine.security.tls.TLSConfig
    max_pdu: int = 0
    timeout: float = 30.0


@dataclass
class Retrieved:
    """The last C-MOVE / C-GET response: the peer's status and its sub-operation counts."""

    status: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 0x0000 or (0xB000 <= self.status <= 0xBFFF and not self.failed)


def _ae(calling: str, remote: Remote) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = remote.timeout
    ae.maximum_pdu_size = remote.max_pdu
    return ae


def _associate(ae: AE, remote: Remote, **kwargs: Any) -> Any:
    if remote.tls is not None:
        from engine.security.tls import client_context

        kwargs["tls_args"] = (client_context(remote.tls), remote.tls.server_name or remote.host)
    try:
        assoc = ae.associate(remote.host, remote.port, ae_title=remote.ae_title, max_pdu=remote.max_pdu, **kwargs)
    except (OSError, ValueError) as e:
        raise NoAssociation(f"cannot associate with {remote.ae_title} at {remote.host}:{remote.port}: "
                      f"{type(e).__name__}") from None
    if not assoc.is_established:
        how = ("rejected the association" if assoc.is_rejected
               else "is not reachable or aborted the association")
        raise NoAssociation(f"cannot associate with {remote.ae_title} at {remote.host}:{remote.port}: it {how} "
                            f"(calling AE {ae.ae_title})")
    return assoc


def find(remote: Remote, calling: str, query: Dataset, *, model: Model = "study",
         limit: int = MAX_MATCHES) -> list[Dataset]:
    """The identifiers a C-FIND returns (at most ``limit`` kept)."""
    ae = _ae(calling, remote)
    ae.add_requested_context(FIND[model], QUERY_SYNTAXES)
    assoc = _associate(ae, remote)
    out: list[Dataset] = []
    final: int | None = None
    try:
        responses: Iterator[tuple[Any, Any]] = assoc.send_c_find(query, FIND[model])
        for status, identifier in responses:
            code = getattr(status, "Status", None)
            if code is None:
                raise QRError(f"{remote.ae_title} did not answer the C-FIND (timeout or abort)")
            if code in (0xFF00, 0xFF01):
                if identifier is not None and len(out) < limit:  # beyond the limit: read, not kept
                    out.append(identifier)
                continue
            final = code
        if final not in (0x0000, 0xFE00):
            raise QRError(f"{remote.ae_title} answered the C-FIND with 0x{final or 0:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _counts(rsp: Any, identifier: Any, out: Retrieved) -> None:
    out.status = int(getattr(rsp, "Status", 0xC000))
    out.completed = int(getattr(rsp, "NumberOfCompletedSuboperations", out.completed) or 0)
    out.failed = int(getattr(rsp, "NumberOfFailedSuboperations", out.failed) or 0)
    out.warning = int(getattr(rsp, "NumberOfWarningSuboperations", out.warning) or 0)
    if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
        v = identifier.FailedSOPInstanceUIDList
        out.failed_uids = [str(x) for x in (v if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue"
                                            else [v]) if str(x)]


def move(remote: Remote, calling: str, query: Dataset, destination: str, *, model: Model = "study") -> Retrieved:
    """C-MOVE the matches of ``query`` to the AE titled ``destination`` (the peer must know it)."""
    ae = _ae(calling, remote)
    ae.add_requested_context(MOVE[model], QUERY_SYNTAXES)
    assoc = _associate(ae, remote)
    out = Retrieved()
    try:
        got_final = False
        for status, identifier in assoc.send_c_move(query, destination, MOVE[model]):
            if getattr(status, "Status", None) is None:
                raise QRError(f"{remote.ae_title} did not answer the C-MOVE (timeout or abort)")
            _counts(status, identifier, out)
            got_final = status.Status not in (0xFF00,)
        if not got_final:
            raise QRError(f"{remote.ae_title} ended the C-MOVE without a final status")
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def get(remote: Remote, calling: str, query: Dataset, on_instance: Callable[[bytes], int], *,
        model: Model = "study") -> Retrieved:
    """C-GET the matches of ``query``; each instance's Part-10 bytes go to ``on_instance``, whose
    return value is the C-STORE status answered (0x0000 stored, 0xA700 not)."""
    ae = _ae(calling, remote)
    ae.add_requested_context(GET[model], QUERY_SYNTAXES)
    roles = []
    for cx in StoragePresentationContexts[:127]:
        ae.add_requested_context(cx.abstract_syntax, GET_SYNTAXES)
        roles.append(build_role(cx.abstract_syntax, scp_role=True))

    def on_store(event: Any) -> int:
        try:
            return on_instance(event.encoded_dataset(include_meta=True))
        except Exception:
            return 0xA700

    assoc = _associate(ae, remote, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    out = Retrieved()
    try:
        got_final = False
        for status, identifier in assoc.send_c_get(query, GET[model]):
            if getattr(status, "Status", None) is None:
                raise QRError(f"{remote.ae_title} did not answer the C-GET (timeout or abort)")
            _counts(status, identifier, out)
            got_final = status.Status not in (0xFF00,)
        if not got_final:
            raise QRError(f"{remote.ae_title} ended the C-GET without a final status")
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def study_query(patient_id: str, *, issuer: str = "", since: str = "", extra: tuple[str, ...] = ()) -> Dataset:
    """A STUDY-level identifier for a patient's studies since a date (YYYYMMDD), with the return keys
    a prefetch decides by."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = patient_id
    if issuer:
        q.IssuerOfPatientID = issuer
    q.StudyDate = f"{since}-" if since else ""
    for kw in ("StudyInstanceUID", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
               "NumberOfStudyRelatedInstances", "StudyDescription", *extra):
        setattr(q, kw, "")
    return q


def parse_keys(keys: list[str]) -> Dataset:
    """``Keyword=value`` / ``Keyword`` (a return key) strings -> an identifier (for the command line)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    ds = Dataset()
    for k in keys:
        name, _, value = k.partition("=")
        name = name.strip()
        if tag_for_keyword(name) is None:
            raise QRError(f"not a DICOM keyword: {name[:40]!r}")
        if dictionary_VR(name) == "SQ":
            raise QRError(f"{name}: sequence keys are not supported here")
        setattr(ds, name, value)
    return ds


def as_part10(data: bytes) -> Dataset:
    from pydicom import dcmread

    return dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
