"""`to: {type: dicom_prefetch}`: fetch a patient's prior studies from other archives before they are needed.

When an order arrives (ORM^O01 / OMI^O23 with ORC-1 NW) or a study is received, the radiologist
will want the patient's earlier studies next to it. This destination asks each configured remote
archive for the patient's studies (C-FIND, Study Root, STUDY level, by Patient ID and a study date
no older than ``max_age_days``), keeps the ones worth having (not the current study, of the
``modalities`` when given, not already in medrelay's archive), takes the newest ``max_studies`` of
them over all sources, and retrieves each: C-MOVE to ``move_destination`` (our own DICOM listener's
AE title, which the remote must know) or C-GET on the same association, the instances then filed
into ``channel`` like a C-STORE to its listener (indexed, de-duplicated, routed by its routes).

A source that cannot be reached, or a retrieve with failed sub-operations, raises a (retried)
delivery error: the next attempt skips what has arrived meanwhile, so retries converge. Every
query and retrieve is audited (who was asked, how many studies and instances; no PHI), and logs
carry counts and study UIDs only. A route on received instances should debounce by study
(``debounce: {key: StudyInstanceUID, seconds: ...}``) so a study triggers one prefetch, not one per
instance.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import func, select

from engine.components import ComponentConfig, DeliveryError, Reference
from engine.context import ComponentContext
from engine.dimse import qr_scu
from engine.envelope import Envelope
from engine.registry import component
from engine.security.tls import TLSConfig
from engine.store.dicom import index as idx
from engine.store.dicom import intake_check, receive
from routes.dicom_scu import check_ae_title

log = structlog.get_logger()


class PrefetchSource(BaseModel):
    """A remote archive to ask for priors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str = Field(description="the remote archive's AE title (called AE)")
    host: str = Field(description="host name or address")
    port: int = Field(ge=1, le=65535, description="TCP port")
    tls: TLSConfig | None = Field(None, description="TLS to the archive")
    retrieve: Literal["move", "get"] = Field("move", description="move: C-MOVE to `move_destination`; get: C-GET, "
                                             "the instances filed into `channel`")
    match_issuer: bool = Field(False, description="send Issuer of Patient ID as a matching key (only for archives "
                               "that match on it)")
    max_pdu: int = Field(0, ge=0, description="largest PDU we accept (0 = unlimited)")
    timeout: float = Field(60.0, gt=0, description="seconds for the association and each DIMSE message")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return check_ae_title(v)


class DicomPrefetchConfig(ComponentConfig):
    """Ask remote archives for the patient's prior studies (C-FIND) and pull them in (C-MOVE / C-GET)."""

    type: Literal["dicom_prefetch"]
    calling_ae_title: str = Field("MEDRELAY", description="our AE title when we associate (the remote's allow-list)")
    sources: list[PrefetchSource] = Field(min_length=1, description="remote archives, asked in this order")
    move_destination: str | None = Field(None, description="C-MOVE destination AE title: medrelay's own DICOM "
                                         "listener as the remote archive knows it")
    channel: str | None = Field(None, description="C-GET: the DICOM channel the retrieved instances are filed "
                                "into (indexed and routed as if its listener had received them)")
    max_studies: int = Field(3, ge=1, le=100, description="most prior studies pulled per order or study")
    max_age_days: float = Field(3650.0, gt=0, description="priors older than this (StudyDate) are not asked for")
    modalities: list[str] = Field(default_factory=list, description="only priors with one of these modalities "
                                  "(ModalitiesInStudy); empty: any")
    same_modality: bool = Field(False, description="only priors sharing a modality with the order or study")
    skip_archived: bool = Field(True, description="a prior the archive holds (as many instances as the remote "
                                "reports) is not pulled again")

    @model_validator(mode="after")
    def _retrieves(self) -> DicomPrefetchConfig:
        if any(s.retrieve == "move" for s in self.sources) and not self.move_destination:
            raise ValueError("a source retrieves with C-MOVE: set move_destination (our listener's AE title)")
        if any(s.retrieve == "get" for s in self.sources) and not self.channel:
            raise ValueError("a source retrieves with C-GET: set channel (the DICOM channel to file instances into)")
        if self.move_destination:
            check_ae_title(self.move_destination)
        check_ae_title(self.calling_ae_title)
        return self

    def references(self) -> list[Reference]:
        """``channel`` must be a DICOM channel of this configuration (checked by `medrelay check`)."""
        return [Reference(("channel",), "dicom_channel", self.channel)] if self.channel else []


@dataclass(frozen=True)
class Trigger:
    """What the order or study says about whom to prefetch for (values are PHI: never logged)."""

    patient_id: str
    issuer: str
    study_uid: str
    accession: str
    modality: str


def trigger_of(env: Envelope) -> Trigger | str:
    """The patient (and current study) of an order or a received instance, or why there is none."""
    if env.kind == "hl7v2":
        from transforms.hl7_text import V2Message

        msg = V2Message.from_bytes(env.payload)
        if msg.message_type not in (("ORM", "O01"), ("OMI", "O23")):
            return f"{'^'.join(msg.message_type)} is not an order"
        orc = msg.first("ORC")
        if orc is None or orc.get(1).upper() != "NW":
            return "not a new order (ORC-1 NW)"
        pid = msg.first("PID")
        if pid is None:
            return "order without PID"
        reps = pid.reps(3)
        pick = next((r for r in reps if len(r) > 4 and r[4] and r[4][0].upper() == "MR"), reps[0] if reps else [])
        patient_id = pick[0][0].strip() if pick and pick[0] else ""
        issuer = pick[3][0].strip() if len(pick) > 3 and pick[3] else ""
        obr, ipc = msg.first("OBR"), msg.first("IPC")
        accession = (ipc.get(1) if ipc else "") or (obr.get(18) if obr else "")
        study = ipc.get(3) if ipc else ""
        modality = (ipc.get(5) if ipc else "") or (obr.get(24) if obr else "")
        return Trigger(patient_id, issuer, study, accession, modality.upper()) if patient_id else "no PID-3"
    if env.kind == "dicom":
        if env.headers.get("event"):
            return "an event message"
        from pydicom import dcmread

        ds = dcmread(io.BytesIO(env.payload), stop_before_pixels=True, force=True,
                     specific_tags=["PatientID", "IssuerOfPatientID", "StudyInstanceUID", "AccessionNumber",
                                    "Modality"])
        pid = str(ds.get("PatientID", "") or "").strip()
        if not pid:
            return "instance without Patient ID"
        return Trigger(pid, str(ds.get("IssuerOfPatientID", "") or "").strip(), str(ds.get("StudyInstanceUID", "")),
                       str(ds.get("AccessionNumber", "") or "").strip(), str(ds.get("Modality", "") or "").upper())
    return f"takes orders (hl7v2) and instances (dicom), not {env.kind}"


def _modalities(ds: Any) -> set[str]:
    v = ds.get("ModalitiesInStudy")
    if v is None or v == "":
        return set()
    vals = v if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue" else str(v).split("\\")
    return {str(x).strip().upper() for x in vals if str(x).strip()}


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


class DicomPrefetch:
    def __init__(self, config: DicomPrefetchConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx

    # -- choosing -------------------------------------------------------------------
    def _archived(self, study_uid: str, remote_count: int | None) -> bool:
        st, se, im = idx.studies, idx.series, idx.instances
        with self.ctx.store.engine.connect() as conn:
            n = conn.execute(select(func.count()).select_from(im.join(se, se.c.pk == im.c.series_pk)
                                                              .join(st, st.c.pk == se.c.study_pk))
                             .where(st.c.study_uid == study_uid)).scalar_one()
        return n > 0 and (remote_count is None or n >= remote_count)

    def choose(self, trig: Trigger, found: list[tuple[PrefetchSource, Any]]) -> tuple[list[tuple[PrefetchSource, Any]],
                                                                                    dict[str, int]]:
        """The priors to pull (newest first, at most ``max_studies``) and why the others were not."""
        cfg = self.config
        why = {"current": 0, "modality": 0, "archived": 0, "over_limit": 0, "duplicate": 0}
        wanted = {m.upper() for m in cfg.modalities}
        seen: set[str] = set()
        keep = []
        for src, ds in found:
            uid = str(ds.get("StudyInstanceUID", "") or "")
            if not uid or uid in seen:
                why["duplicate"] += 1
                continue
            seen.add(uid)
            acc = str(ds.get("AccessionNumber", "") or "").strip()
            if uid == trig.study_uid or (trig.accession and acc == trig.accession):
                why["current"] += 1
                continue
            mods = _modalities(ds)
            if (wanted and not mods & wanted) or (cfg.same_modality and trig.modality and trig.modality not in mods):
                why["modality"] += 1
                continue
            if cfg.skip_archived and self._archived(uid, _int(ds.get("NumberOfStudyRelatedInstances"))):
                why["archived"] += 1
                continue
            keep.append((src, ds))
        keep.sort(key=lambda p: (str(p[1].get("StudyDate", "") or ""), str(p[1].get("StudyTime", "") or "")),
                  reverse=True)
        why["over_limit"] = max(0, len(keep) - cfg.max_studies)
        return keep[:cfg.max_studies], why

    # -- doing ------------------------------------------------------------------------
    def _remote(self, src: PrefetchSource) -> qr_scu.Remote:
        return qr_scu.Remote(src.ae_title, src.host, src.port, src.tls, src.max_pdu, src.timeout)

    def run(self, env: Envelope) -> str:
        trig = trigger_of(env)
        if isinstance(trig, str):
            return f"prefetch: nothing to do ({trig})"
        cfg = self.config
        since = (datetime.now(UTC) - timedelta(days=cfg.max_age_days)).strftime("%Y%m%d")
        found: list[tuple[PrefetchSource, Any]] = []
        for src in cfg.sources:
            query = qr_scu.study_query(trig.patient_id, issuer=trig.issuer if src.match_issuer else "", since=since)
            try:
                matches = qr_scu.find(self._remote(src), cfg.calling_ae_title, query, model="study")
            except qr_scu.QRError as e:
                self._audit("dicom.prefetch.find", src, "failure", {"error": str(e)[:200]}, env)
                raise DeliveryError(f"prefetch: {e}") from None
            self._audit("dicom.prefetch.find", src, "success", {"matches": len(matches)}, env)
            found.extend((src, m) for m in matches)
        chosen, why = self.choose(trig, found)
        pulled = instances = 0
        for src, ds in chosen:
            study_uid = str(ds.StudyInstanceUID)
            got = self._retrieve(src, study_uid, env)
            instances += got.completed + got.warning
            log.info("dicom.prefetch_retrieved", channel=env.channel, source=src.ae_title, study_uid=study_uid,
                     completed=got.completed, failed=got.failed, status=f"0x{got.status:04X}")
            if not got.ok:
                raise DeliveryError(f"prefetch: {src.ae_title} retrieved {got.completed} instances of a study, "
                                    f"{got.failed} failed (status 0x{got.status:04X})")
            pulled += 1
        skipped = ", ".join(f"{k} {v}" for k, v in why.items() if v)
        return (f"prefetch: {len(found)} studies found, {pulled} pulled ({instances} instances)"
                + (f"; skipped: {skipped}" if skipped else ""))

    def _retrieve(self, src: PrefetchSource, study_uid: str, env: Envelope) -> qr_scu.Retrieved:
        from pydicom import Dataset

        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study_uid
        action = "dicom.prefetch.move" if src.retrieve == "move" else "dicom.prefetch.get"
        try:
            if src.retrieve == "move":
                assert self.config.move_destination is not None
                got = qr_scu.move(self._remote(src), self.config.calling_ae_title, q, self.config.move_destination)
            else:
                got = qr_scu.get(self._remote(src), self.config.calling_ae_title, q, self._filer(src))
        except qr_scu.QRError as e:
            self._audit(action, src, "failure", {"study_uid": study_uid, "error": str(e)[:200]}, env)
            raise DeliveryError(f"prefetch: {e}") from None
        self._audit(action, src, "success" if got.ok else "failure",
                    {"study_uid": study_uid, "completed": got.completed, "failed": got.failed,
                     "warning": got.warning}, env)
        return got

    def _filer(self, src: PrefetchSource) -> Any:
        """C-GET: each instance into intake on ``channel``, indexed like a C-STORE to its listener, and
        refused like one (``intake_check``: a data set cut short 0xC000, no Study/Series UID or SOP UIDs
        other than the sub-operation's command 0xA900,
        logged and audited as a failed receive; the remote counts it as a failed sub-operation)."""
        intake, store = self.ctx.intake, self.ctx.store
        hkey = self.ctx.keyring.hmac_key(idx.HMAC_KEY_NAME)
        channel = self.config.channel or ""
        calling = self.config.calling_ae_title

        def file(part10: bytes) -> int:
            if intake is None:
                return 0xA700
            # the sub-operation's command: its Affected UIDs are the meta's (as the audit row names them)
            sop_class, sop_uid, ts = intake_check.meta_uids(part10)
            seen = {"channel": channel, "sop_class": intake_check.uid_as_given(sop_class),
                    "sop_uid": intake_check.uid_as_given(sop_uid), "transfer_syntax": ts,
                    "calling_aet": src.ae_title, "called_aet": calling, "peer": f"{src.host}:{src.port}"}
            try:
                rec = receive.prepare(part10)
            except Exception as e:  # refused as the listener refuses it: same status, log line and audit row
                return intake_check.refuse_error(self.ctx.audit, e, **seen)[0]
            refused = intake_check.check_attrs(rec.attrs, sop_class, sop_uid)  # the listener's check: 0xA900
            if refused is not None:
                return intake_check.refuse(self.ctx.audit, refused, **seen)[0]
            env = Envelope(channel=channel, kind="dicom", payload=part10,
                           headers={**rec.headers(), "CallingAETitle": src.ae_title, "CalledAETitle": calling},
                           peer=f"{src.host}:{src.port}")
            outcome = intake.submit_blocking(env, tx_hook=receive.index_hook(store, hkey, rec))
            return 0x0000 if outcome.ok else 0xC000 if outcome.status == "rejected" else 0xA700

        return file

    def _audit(self, action: str, src: PrefetchSource, outcome: str, entity: dict[str, Any], env: Envelope) -> None:
        self.ctx.audit.record(action, outcome=outcome, actor=self.config.calling_ae_title,
                              peer=f"{src.host}:{src.port}", channel=env.channel, message_id=env.id,
                              entity={"source": src.ae_title, **entity})

    async def send(self, envelope: Envelope) -> str | None:
        t0 = time.perf_counter()
        detail = await asyncio.to_thread(self.run, envelope)
        log.info("dicom.prefetch", channel=envelope.channel, message_id=envelope.id, detail=detail,
                 ms=round((time.perf_counter() - t0) * 1000))
        return detail

    async def close(self) -> None:
        return None


@component("destination", "dicom_prefetch", config=DicomPrefetchConfig)
def build(config: DicomPrefetchConfig, ctx: ComponentContext) -> DicomPrefetch:
    """Prior studies for an order or a received study: C-FIND at remote archives, then C-MOVE / C-GET."""
    settings = getattr(ctx, "settings", None)
    if config.channel and settings is not None:
        ch = getattr(settings, "channels", {}).get(config.channel)
        if ch is None or getattr(ch.source, "type", "") != "dicom":
            raise ValueError(f"dicom_prefetch: channel {config.channel!r} is not a DICOM channel of this configuration")
    return DicomPrefetch(config, ctx)
