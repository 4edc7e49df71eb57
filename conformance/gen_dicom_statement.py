"""Generate conformance/dicom-conformance-statement.md from the code (PS3.2 outline).

The SOP classes, transfer syntaxes, status codes and configuration keys are read
from the modules that use them, so the statement cannot promise what the code does
not do. tests/test_dicom_conformance.py regenerates it in memory and fails when the
committed file differs. Run: .venv/bin/python conformance/gen_dicom_statement.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydicom.uid import UID  # noqa: E402

from engine.cli.docs import config_fields  # noqa: E402
from engine.dimse import qr_scu  # noqa: E402
from engine.store.dicom import index as idx  # noqa: E402
from engine.store.dicom import iocm, terms  # noqa: E402
from listeners import dicom_contexts as cx  # noqa: E402
from listeners import dicom_dimse as dimse  # noqa: E402
from listeners import dicom_mpps as mpps_scp  # noqa: E402
from listeners import dicom_ul as ul  # noqa: E402
from listeners import dicomweb_qido, dicomweb_stow, dicomweb_wado  # noqa: E402
from listeners.dicom import DicomPeer, DicomSourceConfig, StorageCommitmentConfig  # noqa: E402
from listeners.dicom_status import TABLES  # noqa: E402
from listeners.dicomweb import DicomWebSourceConfig  # noqa: E402
from listeners.dicomweb_json import BULK_THRESHOLD, MAX_DEPTH  # noqa: E402
from listeners.dicomweb_render import MAX_VIEWPORT, THUMBNAIL  # noqa: E402
from routes.dicom import PERMANENT_RANGES, DicomDestinationConfig  # noqa: E402
from routes.dicom_prefetch import DicomPrefetchConfig, PrefetchSource  # noqa: E402
from transforms import dicom_codec as codec  # noqa: E402
from transforms.deid_config import DEFAULT_QUARANTINE_MODALITIES  # noqa: E402

OUT = ROOT / "conformance" / "dicom-conformance-statement.md"


def _name(uid: str) -> str:
    return UID(uid).name


def _uid_table(uids: tuple[str, ...] | list[str], role: str) -> list[str]:
    rows = ["| SOP Class | UID | Role |", "|---|---|---|"]
    rows += [f"| {_name(u)} | `{u}` | {role} |" for u in uids]
    return rows


def _ts_table(uids: tuple[str, ...]) -> list[str]:
    rows = ["| Transfer Syntax | UID |", "|---|---|"]
    rows += [f"| {_name(u)} | `{u}` |" for u in uids]
    return rows


SUBOP_FINAL = (
    "The final response follows PS3.4 C.4.2.3.1 / C.4.3.3.1: Success when every sub-operation "
    "succeeded; Warning 0xB000 when some failed or had a warning and others did not; Failure 0xC000 when "
    "every one was attempted and failed, whatever the cause (no storage context, a conversion that "
    "cannot be done, a stored instance that does not open, the peer refusing the C-STORE). Failed ones "
    "are counted in Number of Failed Sub-operations and listed in the Failed SOP Instance UID List "
    "(0008,0058), the response's identifier; 0xA702 is not sent. Each is logged (and audited) as failed, "
    "never as sent.")


def _status_table(service: str) -> list[str]:
    rows = ["| Code | Category | Meaning | Reference | Sent when |", "|---|---|---|---|---|"]
    for s in TABLES[service].values():
        rows.append(f"| 0x{s.code:04X} | {s.category} | {s.meaning} | {s.reference} | {s.when} |")
    return rows


def _config_table(model: type) -> list[str]:
    rows = ["| Key | Default | Description |", "|---|---|---|"]
    for name, f in config_fields(model):
        if name == "type":
            continue
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        rows.append(f"| `{f.alias or name}` | {default} | {f.description or ''} |")
    return rows


def _keys(level: str) -> str:
    derived = [k for k, lv in idx.DERIVED.items() if lv == level]
    return ", ".join(f"`{k}`" for k in (*idx.LEVEL_ATTRS[level], *derived))


def _conversion_table() -> list[str]:
    rows = ["| Stored as | Can be sent as |", "|---|---|"]
    for ts in cx.STORAGE_TRANSFER_SYNTAXES:
        targets = [t for t in codec.convertible(ts) if t != ts]
        lossy = [t for t in targets if t in codec.LOSSY_METHOD]
        text = ", ".join(f"{_name(t)} (`{t}`)" + (" *lossy, only when configured*" if t in lossy else "")
                         for t in targets)
        rows.append(f"| {_name(ts)} (`{ts}`) | {text or 'only as stored (no decoder installed)'} |")
    return rows


DICOMWEB_SERVICES = [
    ("QIDO-RS", "GET", "/studies, /studies/{study}/series, /studies/{study}/series/{series}/instances, "
     "/studies/{study}/instances, /series, /instances", "application/dicom+json"),
    ("WADO-RS", "GET", "/studies/{study}, .../series/{series}, .../instances/{instance}",
     'multipart/related; type="application/dicom" (transfer-syntax=UID or *)'),
    ("WADO-RS", "GET", ".../metadata (study, series, instance)", "application/dicom+json"),
    ("WADO-RS", "GET", ".../instances/{instance}/bulkdata/{tag}",
     'multipart/related; type="application/octet-stream", or application/octet-stream with Range; '
     "encapsulated Pixel Data: decoded (octet-stream) or as /frames' stored type, one part per frame"),
    ("WADO-RS", "GET", ".../instances/{instance}/frames/{list}",
     'multipart/related; type="application/octet-stream" (decoded) or the stored type '
     "(image/jpeg, image/jls, image/jp2, image/jphc, image/dicom-rle)"),
    ("WADO-RS", "GET", ".../rendered, .../thumbnail (study, series, instance, frames/{list})",
     "image/jpeg, image/png"),
    ("STOW-RS", "POST", "/studies, /studies/{study}",
     'request multipart/related; type="application/dicom" or type="application/dicom+json" (metadata + '
     'bulk data); response application/dicom+json'),
    ("WADO-URI", "GET", "{base}?requestType=WADO&studyUID=&seriesUID=&objectUID= (also {base}/wado)",
     "application/dicom, image/jpeg, image/png"),
]


def _dicomweb_section() -> list[str]:
    rows = ["| Service | Method | Resources (under `base_path`) | Media types |", "|---|---|---|---|"]
    rows += [f"| {a} | {b} | `{c}` | {d} |" for a, b, c, d in DICOMWEB_SERVICES]
    return [
        "## 6 DICOMweb (PS3.18; `source: {type: dicomweb}`)",
        "",
        "Serves the same archive as the DICOM listener (its index and encrypted instances). Every request "
        "needs a bearer token (or `auth: {open: true}`); CORS answers browsers of `cors.allow_origins`. "
        "Every query is audited as a Query event and every retrieval as Instances Transferred (PS3.15 A.5), "
        "failed logins as User Authentication.",
        "",
        *rows,
        "",
        "- QIDO-RS matching is C-FIND's (section 3.3): single values, `*`/`?` wildcards, ranges of dates and "
        "times, UID lists (comma-separated), case-insensitive person names when `case_insensitive_pn`; "
        "attributes by keyword or 8-digit tag; `includefield` (a list or `all`), `limit`, `offset`; "
        "`fuzzymatching=true` is answered with literal matching and a Warning header. Results are the "
        "default attributes of PS3.18 Tables 10.6.3-3/4/5 (those the index holds) with RetrieveURL, and of "
        "the levels above when the path does not fix them (10.6.3.3.2/3: `/series` adds the study ones, "
        "`/instances` the study and series ones, `/studies/{study}/instances` the series ones); more "
        "than `max_results` are announced with a Warning header. Sequence attributes cannot be matched. "
        "DA, TM, DT, IS and DS values are checked (PS3.5 syntax, real calendar dates and clock times, a "
        "range's start not after its end, PS3.4 C.2.2.2.5): an invalid one is 400 naming the attribute, "
        "not an empty result. `limit` and `offset` are non-negative integers (else 400); above "
        f"{dicomweb_qido.COUNT_CLAMP} they are taken as {dicomweb_qido.COUNT_CLAMP} (a limit is at most "
        "`max_results` anyway, an offset past the results is 204). `anonymize` on any RESTful resource "
        "(QIDO-RS, WADO-RS, STOW-RS) is 400: only WADO-URI de-identifies.",
        "- WADO-RS: an instance goes in its stored syntax when the Accept header allows it "
        "(`transfer-syntax=*` or its UID); the default for application/dicom is Explicit VR Little Endian "
        "(converted, section 3.8). One instance that cannot be converted is answered 406; in a study or "
        "series response it is left out, logged and counted as failed in the audit row (406 when none can "
        "be given). One instance is given single-part (`Accept: application/dicom`, PS3.18 Table 8.7.4-1) "
        "when Accept prefers that to multipart. A malformed UID in the path or a UID query key is 400. "
        "Metadata gives "
        f"every binary value longer than {BULK_THRESHOLD} bytes (also inside sequence items, "
        f"`/bulkdata/{{tag}}/{{item}}/{{tag}}`, {MAX_DEPTH} levels deep), and Pixel Data always, as a "
        "BulkDataURI. Bulk data of an encapsulated Pixel Data (PS3.18 8.7.3.3.2, Table 8.7.3-5) goes the "
        "/frames way: application/octet-stream (the default, or `transfer-syntax=1.2.840.10008.1.2.1`) is "
        "the decoded native pixel data in one part (byte ranges are of it); the stored compressed media type "
        "(image/jp2, image/jpeg, image/jls, image/dicom-rle...) or `type=\"*/*\"; transfer-syntax=*` gives "
        "one part per frame with its transfer-syntax, never the item-tag encoding; anything else is 406. "
        "The decoded value of a large instance (16 MiB or more) is decoded frame by frame as it is read "
        "and sent as it is decoded, never whole in memory; a byte range of it decodes only the frames it "
        "covers; other decoded values are "
        f"capped at {codec.MAX_WHOLE_BYTES // (1024 * 1024)} MiB (406). "
        "Rendered images: one frame (a study/series: its middle instance), Modality LUT, then "
        "the `window` parameter (center,width[,linear|linear-exact|sigmoid]) or the data set's first "
        "window or the frame's range, MONOCHROME1 inverted; `viewport=vw,vh[,sx,sy,sw,sh]` scales the "
        "source region (negative sw/sh flip it) to fit (at most "
        f"{MAX_VIEWPORT}), WADO-URI `region` crops, thumbnails fit {THUMBNAIL}x{THUMBNAIL}. At most "
        f"{dicomweb_wado.MAX_FRAMES_PER_REQUEST} frames per request. An instance of "
        f"{dicomweb_wado.STREAM_FROM // (1024 * 1024)} MiB or more that goes in its stored syntax (WADO-RS "
        "instance, series, study; WADO-URI) is sent part by part as its chunks are read and decrypted, "
        "never whole in memory; so is one converted to another syntax, decoded (and encoded) frame by frame "
        "as it is read (section 3.8); other conversions are done in memory. Bulk data has byte ranges "
        "(PS3.18 8.3.5.2): one `Range` byte range is answered 206 with the single part "
        "application/octet-stream whenever Accept allows it (no Accept included), an unsatisfiable one "
        "416, an invalid one or several ranges are ignored (the whole value); the other resources ignore "
        "Range.",
        "- WADO-URI `anonymize=yes` (PS3.18 9.4.2.3, contentType application/dicom): the instance "
        "de-identified by the PS3.15 Basic Profile exactly as the `deidentify` transform does it with no "
        "options (Table E.1-1 at every depth, pseudonymous Patient ID and Name, "
        "shifted dates, new UIDs, Patient Identity Removed YES with the CID 7050 codes), in the "
        "transferSyntax asked for. The pseudonyms and new UIDs are the same on every request for the "
        "same instance; they are keyed by a secret derived from the key ring's `deid` secret, not that "
        "secret itself, so what a DICOMweb user sees cannot be linked to the exports of `deidentify` "
        "routes. An instance the profile quarantines (burned-in text possible: BurnedInAnnotation YES, "
        "Secondary Capture, ultrasound, encapsulated PDF, modalities "
        f"{', '.join(DEFAULT_QUARANTINE_MODALITIES)}) is refused "
        "with 403, never given identified. Another `anonymize` value, `anonymize` with a rendered "
        "contentType, and `presentationUID`/`presentationSeriesUID` (not supported) are 400.",
        "- STOW-RS: each part is a DICOM Part-10 instance stored through the Storage SCP's own path "
        "(section 3.1: the same checks, de-duplication and durability); the response is sent after every "
        "part is committed. Status: 200 all stored, 202 some stored, 409 none stored (PS3.18 Table "
        "10.5.3-1); each failed instance is in FailedSOPSequence with its Failure Reason: 0xA700 "
        "(not committed), 0xA900 (UIDs missing or different from the file meta, or not of the study in the "
        "URL), 0xC000 (not a readable DICOM Part-10 part, a part without Content-Type, or a part of "
        "another type than the body's `type=` declares). A re-sent instance counts as stored. The "
        "response is application/dicom+json only: an Accept that excludes it (application/dicom+xml) is "
        "406 before the body is read. A part of "
        "16 MiB or more is not held in memory: it is streamed to its blob as it arrives and indexed from "
        "its header, as a large C-STORE data set on medrelay's own Upper Layer (section 3.2), and committed when "
        "the part ends; a body cut off mid-part leaves nothing of that part. Smaller parts are held in "
        "memory within `max_body_bytes`, the whole body is bounded by `max_stream_bytes`. "
        f"At most {dicomweb_stow.MAX_PARTS} parts per request.",
        "- STOW-RS metadata + bulk data (PS3.18 10.5.1.2.2, `type=\"application/dicom+json\"`): each "
        "`application/dicom+json` part is a JSON array of instances (PS3.18 F.2) whose BulkDataURI values "
        "name other parts of the body by `Content-Location` (absolute or its path) or `Content-ID` "
        "(`cid:`); InlineBinary is accepted too. Each instance is rebuilt as a Part-10 instance and stored "
        "as an `application/dicom` part. Pixel Data in an `application/octet-stream` part: Explicit VR "
        "Little Endian; in a part whose media type has `transfer-syntax=` of an encapsulated syntax (e.g. "
        "`image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90`): one compressed frame, stored in that syntax "
        "(compressed multi-frame bulk data is refused). An instance whose JSON cannot be read, whose "
        "BulkDataURI names no part, or without SOP Class/Instance UID fails with 0xC000, as does an "
        "`application/dicom` part in such a body (instances go in a `type=\"application/dicom\"` body) "
        "or a part without Content-Type; a body without an `application/dicom+json` part is 400. These bodies are "
        "held in memory within `max_body_bytes` and never streamed (a larger one is 413).",
        "",
        "### 6.1 Configuration",
        "",
        *_config_table(DicomWebSourceConfig),
        "",
    ]


def render() -> str:
    permanent = ", ".join(f"0x{lo:04X}" if lo == hi else f"0x{lo:04X}-0x{hi:04X}" for lo, hi in PERMANENT_RANGES)
    out: list[str] = [
        "# medrelay DICOM Conformance Statement",
        "",
        "<!-- Generated by conformance/gen_dicom_statement.py from the code; do not edit by hand. -->",
        "",
        "Follows the outline of DICOM PS3.2 Annex A. Implementation: medrelay 0.1 (Python, pynetdicom "
        "3 / pydicom 3).",
        "",
        "## 1 Implementation model",
        "",
        "One DICOM Application Entity per `source: {type: dicom}` channel (the listener AE), one "
        "requesting AE per `to: {type: dicom}` route (the C-STORE SCU) and one per `to: {type: dicom_prefetch}` "
        "route and `medrelay dicom find|move` command (the Query/Retrieve SCU). The listener stores what it "
        "receives in medrelay's encrypted store, indexes it (patient / study / series / instance) and "
        "answers queries and retrievals from that archive. Every received instance is also routed through "
        "the channel's routes (forwarding, conversion, de-identification).",
        "",
        "Real-world activities: *store instance* (a modality or PACS sends), *query archive*, *retrieve "
        "from archive* (C-MOVE to a configured AE, C-GET on the same association), *verify*, *forward "
        "instance* (a route sends to a remote Storage SCP), *report procedure step* (a modality's MPPS), "
        "*commit storage* (a modality asks which instances the archive is responsible for), *prefetch priors* "
        "(an order or a study makes medrelay ask remote archives for the patient's earlier studies).",
        "",
        "## 2 AE specifications",
        "",
        "### 2.1 Listener AE: SOP classes",
        "",
        *_uid_table(cx.VERIFICATION, "SCP"),
        "",
        "Query/Retrieve (when `query_retrieve: true`, the default):",
        "",
        *_uid_table([*cx.QR_FIND, *cx.QR_MOVE, *cx.QR_GET], "SCP"),
        "",
        "Modality Worklist (when `worklist: true`, the default):",
        "",
        *_uid_table(cx.WORKLIST_FIND, "SCP"),
        "",
        "Modality Performed Procedure Step (when `mpps: true`, the default) and Storage Commitment Push "
        "Model (when `storage_commitment.enabled`, the default; SCP of N-ACTION, and requestor of the "
        "N-EVENT-REPORT, with the SCP role proposed, on a new association):",
        "",
        *_uid_table([*cx.MPPS, *cx.STORAGE_COMMITMENT], "SCP"),
        "",
        f"Storage: {len(cx.STORAGE_SOP_CLASSES)} storage SOP classes: all known to pynetdicom "
        f"(`AllStoragePresentationContexts`) and {len(cx.RETIRED_IMAGE_STORAGE)} retired image storage "
        "classes older modalities still send, as SCP; as SCU for C-GET sub-operations when the "
        "requestor proposes the SCP role for them (SCP/SCU Role Selection, PS3.7 D.3.3.4):",
        "",
        *_uid_table(cx.STORAGE_SOP_CLASSES, "SCP (SCU for C-GET)"),
        "",
        "### 2.2 Listener AE: presentation contexts",
        "",
        "Transfer syntaxes accepted for every storage SOP class. Data sets are stored as received "
        "unless a route's `dicom_transcode` transform files them in another syntax (section 3.8); "
        "C-MOVE / C-GET / forwarding send the archived data set unchanged when the peer accepts its "
        "transfer syntax, converted otherwise (section 3.8).",
        "",
        *_ts_table(cx.STORAGE_TRANSFER_SYNTAXES),
        "",
        "Transfer syntaxes accepted for Verification, Query/Retrieve and Modality Worklist:",
        "",
        *_ts_table(cx.QUERY_TRANSFER_SYNTAXES),
        "",
        "### 2.2.1 Query/Retrieve SCU AE (`dicom_prefetch`, `medrelay dicom find|move`)",
        "",
        *_uid_table([*cx.QR_FIND, *cx.QR_MOVE, *cx.QR_GET], "SCU"),
        "",
        f"For C-GET the first {len(qr_scu.StoragePresentationContexts[:127])} storage SOP classes of pynetdicom's "
        "`StoragePresentationContexts` are proposed with SCP/SCU Role Selection (SCP role), each with these "
        "transfer syntaxes; the C-FIND / C-MOVE / C-GET contexts themselves with Explicit and Implicit VR "
        "Little Endian:",
        "",
        *_ts_table(tuple(qr_scu.GET_SYNTAXES)),
        "",
        "The prefetch asks at STUDY level of Study Root (Patient ID, Study Date range `YYYYMMDD-`; Issuer of "
        "Patient ID only with `match_issuer`; return keys Study Instance UID, Study Time, Accession Number, "
        "Modalities in Study, Number of Study Related Instances, Study Description) and retrieves whole "
        "studies. A C-GET instance is filed like a C-STORE to the configured channel's listener (the index "
        "look-up answers a known SOP Instance UID as a duplicate); its C-STORE response is 0x0000, 0xA900 "
        "(UIDs missing, not filed), 0xC000 (a UID filed under another parent, section 3.2) or 0xA700 (not "
        "committed). Success and Warning final statuses without "
        "failed sub-operations count as retrieved; anything else is retried.",
        "",
        "### 2.3 Association policies",
        "",
        "- Association acceptance: the Called AE Title must equal `ae_title`; the Calling AE Title must be "
        "in `calling_aets` unless `allow_any_calling_aet: true` is configured (a listener with neither is "
        "a configuration error). Otherwise A-ASSOCIATE-RJ (rejected-permanent, service-user, reason "
        "called-AE-title-not-recognized (checked first) or calling-AE-title-not-recognized). Rejections "
        "are logged with the reason and both AE titles and written to the audit trail.",
        "- Maximum PDU size received: `max_pdu` (default 262144). Number of simultaneous associations: "
        "`max_associations`, beyond which A-ASSOCIATE-RJ (rejected-transient, service-provider "
        "presentation related, local limit exceeded). Open TCP connections, associated or not: "
        "`max_connections`; one more is closed at accept. Asynchronous operations window: not supported (1/1).",
        f"- Limits on what a peer declares, checked before anything is read: an A-ASSOCIATE-RQ of at most "
        f"{ul.ASSOCIATE_RQ_MAX // 1024} KiB (128 presentation contexts with ~28 transfer syntaxes each fit), a "
        "P-DATA-TF of at most `max_pdu` (0: 256 MiB), A-ASSOCIATE-RJ / A-RELEASE / A-ABORT of 4 bytes, a "
        f"command set of {dimse.MAX_COMMAND // 1024} KiB. A longer PDU gets A-ABORT (service-provider, "
        "invalid-PDU-parameter value) and the connection is closed, on both implementations below. Before "
        "association, any first PDU other than A-ASSOCIATE-RQ gets A-ABORT (unexpected or unrecognized PDU; "
        "an A-ABORT only closes).",
        "- Timeouts: `acse_timeout` (ARTIM: the TLS handshake and the complete A-ASSOCIATE-RQ must arrive "
        "within it of the connect, else the connection is closed), `dimse_timeout`, `idle_timeout` (an "
        "established association with no byte from the peer, or a PDU begun and not finished, for that "
        "long is aborted; `network_timeout` is accepted as its former name).",
        "- Two implementations behind one port, with the same acceptance rules, presentation contexts and "
        "statuses: an association that proposes only Storage and Verification contexts and no extended "
        "negotiation (no SCP/SCU role selection, user identity, SOP class extended or asynchronous "
        "operations items) is served by medrelay's own Upper Layer (`listeners/dicom_ul.py`, for speed "
        "and so that large data sets stream), over plain TCP or over TLS alike (after the handshake, with "
        "the same certificate checks); every other association by pynetdicom. On the former, a "
        "P-DATA-TF longer than `max_pdu`, a PDV on a presentation context that was not accepted, a data "
        "set fragment without its command, a command other than C-STORE or C-ECHO, or any other "
        "unexpected PDU is answered with A-ABORT (service-provider). On both, a C-STORE-RQ goes through "
        "the same check before anything is stored: without Message ID or without a data set, A-ABORT; "
        "an Affected SOP Class/Instance UID that is empty, longer than 64 characters or not digits and "
        "dots, or a SOP class other than the presentation context's, 0xA900 after its data set (the "
        "response echoes the Affected SOP Instance UID only when it is valid).",
        "- C-MOVE sub-operations open a new association to the configured destination, proposing one "
        "presentation context per (SOP class, stored transfer syntax), plus an uncompressed fallback per SOP "
        "class (Explicit / Implicit VR Little Endian) used only for uncompressed data sets.",
        "- Implementation Class UID and Version Name: pynetdicom's.",
        "",
        "## 3 SOP specific conformance",
        "",
        "### 3.1 Verification SCP",
        "",
        *_status_table("C-ECHO"),
        "",
        "### 3.2 Storage SCP",
        "",
        "Level 2 (Full) storage: the complete data set is kept, as received, encrypted at rest. The "
        "success status is sent only after the instance, its index rows and its routing entries are "
        "committed to durable storage (SQLite WAL with synchronous=FULL or PostgreSQL). The SOP Instance "
        "UID is never used as a file name. A re-sent SOP Instance UID is recognised: with "
        "`duplicates: keep_first` (default) the first copy is kept and Success is returned without "
        "routing again; with `duplicates: replace` a data set with different content replaces the archive "
        "entry and is routed, an identical re-send is recognised and not routed twice.",
        "",
        "Large data sets on medrelay's own Upper Layer (section 2.3: plain storage associations, over TCP "
        "or TLS) are not held in memory: from 16 MiB (`STREAM_MIN`) on, the P-DATA fragments are sealed in "
        "authenticated 1 MiB chunks and written to the blob as they arrive, the index attributes are read"
        " from the elements before the pixel data (at most the first 32 MiB of the data set: an instance "
        "whose header is longer is refused with 0xC000), and the response follows the commit as for any "
        "instance. An association that ends before the data set is complete (A-ABORT, a closed "
        "connection, an idle timeout) gets no response and leaves nothing stored. Big Endian data sets, "
        "and every association served by pynetdicom (one that also proposes Query/Retrieve, Worklist, MPPS "
        "or Storage Commitment, or asks for extended negotiation, role selection or user identity), are "
        "assembled in memory before they are stored.",
        "",
        "#### Patient identity in the archive",
        "",
        "- Patients are keyed by Patient ID (0010,0020) together with Issuer of Patient ID (0010,0021). An "
        "absent or empty issuer is a value of its own, not a wildcard: Patient ID `123` without an issuer and "
        "`123` from issuer `A` are two patients. The Issuer of Patient ID Qualifiers Sequence is not part of "
        "the key.",
        "- An instance whose Patient ID is absent, empty or blank is never filed under a patient shared with "
        "other studies: each such study gets a patient of its own (keyed by its Study Instance UID) with the "
        "patient attributes of the study's first instance, so C-FIND at PATIENT level returns one patient per "
        "study, under its own name and with an empty Patient ID, and a C-FIND by that name returns that "
        "study only.",
        "- First writer wins. A patient keeps the attributes (name, birth date, sex, ...) of the first instance "
        "that named it: a later instance with the same Patient ID and issuer but another name is filed under "
        "that patient, does not rename it, and is not found by C-FIND for the other name. A study keeps the "
        "patient its first instance named: a later instance of the same Study Instance UID that names another "
        "patient is filed under the study's patient. Neither is refused; the instance is stored as received. "
        "Patient updates and merges from the HIS change the archive's patient (section 3.6.3), not the "
        "instances that arrive later.",
        "- A UID filed under another parent is refused, never filed there: an instance whose Series Instance "
        "UID is already filed under another study, or whose SOP Instance UID is already filed under another "
        "series with other content, gets 0xC000 with the Error Comment \"Series Instance UID is filed under "
        "another study; not stored\" or \"SOP Instance UID is filed under another series; not stored\" (no "
        "UID, no PHI), on every intake path (C-STORE, STOW-RS, file source, C-GET prefetch, the `store` "
        "destination), with `duplicates: replace` too (replacing would move the instance to another "
        "study). It is not stored, routed or retried, and is audited as a failed receive. The same bytes "
        "again are a duplicate (0x0000); other content in the same series is kept first or replaced as "
        "`duplicates` says.",
        "- A STOW-RS part or file-source file whose file meta names another SOP Class/Instance UID than its "
        "data set is stored under the data set's UIDs, with a file meta written anew to match.",
        "- A data set cut short is refused, never stored: its whole structure (every element's tag and "
        "length, sequences, items and encapsulated fragments of defined or undefined length, explicit and "
        "implicit VR Little Endian, deflated inflated as it passes, Explicit VR Big Endian) is walked before "
        "anything is stored, so "
        "an instance complete by its protocol (last PDV, closed STOW-RS part, whole file) whose last "
        "element, an item or a fragment declares more bytes than it holds gets 0xC000 with the Error "
        "Comment \"data set cut short or its lengths do not nest; not stored\" on every intake path "
        "(C-STORE small and streamed, STOW-RS, file source, `medrelay import`, C-GET prefetch), is audited "
        "as a failed receive, and leaves no blob. In a Big Endian data set a UN of undefined length is "
        "walked and read as the sequence in Implicit VR Little Endian it is (PS3.5 6.2.2, as DCMTK reads "
        "it), items and delimiters included; one whose items are big-endian is left to pydicom's reader.",
        "- Every refusal of a data set by the Storage SCP before the index (0xA900: no or an invalid "
        "Study/Series Instance UID, a SOP Class/Instance UID other than the command's; 0xC000: cannot be "
        "decoded, nested too deep, header too long, cut short) is answered with the same status on every "
        "intake path, C-GET prefetch sub-operations included, and audited as a failed receive (PS3.15 A.5 "
        "DICOM Instances Transferred, outcome failure: the command's SOP Class/Instance UID and AE titles, "
        "the reason; no PHI). So are the C-STORE-RQ command checks made before the data set arrives "
        "(invalid Affected SOP Class/Instance UID, an Affected SOP Class UID other than the presentation "
        "context's: 0xA900, the UIDs as given, at most 64 printable characters), on both association paths. "
        "So are STOW-RS parts and file-source files refused before they reach the Storage SCP (no "
        "Content-Type, not DICOM Part 10, unreadable file meta, invalid UIDs in it, another study than the "
        "request URL's, a metadata instance that cannot be built; a DICOM file a channel does not take), "
        "with the UIDs the file meta names where it can be read, and a STOW-RS body refused whole (too "
        "large, malformed, no parts): one failed receive without UIDs.",
        "- An archive written by an earlier medrelay, which merged every instance without Patient ID into one "
        "patient, is split at the first start of this version: each study gets its own patient, with the "
        "patient attributes read again from its stored instance.",
        "",
        *_status_table("C-STORE"),
        "",
        "### 3.3 Query/Retrieve SCP: C-FIND",
        "",
        "Hierarchical query (no relational queries, no extended negotiation). Levels: PATIENT, STUDY, "
        "SERIES, IMAGE for Patient Root; STUDY, SERIES, IMAGE for Study Root. Matching per PS3.4 "
        "C.2.2.2: single value, universal, wildcard (`*`, `?`), list of UIDs, range (DA, TM, DT). Person "
        "Names match case-insensitively when `case_insensitive_pn: true` (the default). Keys above the "
        "query level are used for matching as well (Study Root carries patient attributes at STUDY level). "
        "Responses contain the requested keys only, plus Query/Retrieve Level, Retrieve AE Title and "
        "Instance Availability (ONLINE) when requested, and Specific Character Set ISO_IR 192 (UTF-8) when "
        "a value is not ASCII. Sequence keys are returned empty. A multi-valued attribute (Image Type, "
        "Modalities in Study) matches when any of its values matches; a key of several values (backslash) "
        "matches when any of them does. IS and DS keys match numerically (`+7` and `007` match `7`; PS3.4 "
        "C.2.2.2.1.1 leaves this to the implementation).",
        "",
        "Keys the index holds:",
        "",
        *[f"- {lv}: {_keys(lv)}" for lv in idx.LEVELS],
        "",
        f"{', '.join(f'`{k}`' for k in terms.SCOPES)} are matched through a blind index (keyed HMAC terms of the "
        "case- and accent-folded value, of its words and of its first one to eight characters): a single "
        "value, a list of values, or a wildcard that begins with literal characters (`DOE*`, `DOE^J*`, "
        "`12?4*`) narrows the candidates in SQL, and only those are decrypted for the final PS3.4 matching. "
        "A wildcard that begins with `*` or `?` (`*DOE`) decrypts every row of the query level. UIDs, "
        "Study Date and Content Date (single value and range) and Modality narrow in SQL too; other keys are "
        "matched on the candidates.",
        "",
        *_status_table("C-FIND"),
        "",
        "### 3.4 Query/Retrieve SCP: C-MOVE",
        "",
        "Move destinations are configured by AE title (`move_destinations`); sub-operations are sent "
        "with the stored transfer syntax and the data set exactly as received when the destination accepts "
        "it (a context per stored syntax is proposed, plus an uncompressed one per SOP class), else "
        "converted (section 3.8). An instance that cannot be converted is a failed sub-operation "
        "(never counted as completed).",
        "",
        SUBOP_FINAL,
        "",
        *_status_table("C-MOVE"),
        "",
        "### 3.5 Query/Retrieve SCP: C-GET",
        "",
        "Sub-operations are C-STORE requests on the same association, for the SOP classes the requestor "
        "proposed with the SCP role, in the stored syntax when it was accepted, else converted to the one "
        "that was (section 3.8); an instance that cannot be converted is a failed sub-operation. A storage "
        "context proposed with the SCP role and several transfer syntaxes is accepted with the first of "
        "them, in the requestor's order, that any instance can be sent in (Explicit or Implicit VR Little "
        "Endian, or a lossless compressed syntax medrelay encodes: JPEG 2000 lossless, RLE, JPEG-LS "
        "lossless where installed); so a requestor preferring the stored syntax gets the instance as "
        "stored, and one that proposes each syntax in a context of its own gets the stored one whenever it "
        "proposed it.",
        "",
        SUBOP_FINAL + " DCMTK getscu (3.6.7, `DcmSCU`) does not read the data set of a C-GET response, so "
        "after a final 0xB000 or 0xC000 it finds the Failed SOP Instance UID List unread when it releases "
        "(`DUL P-Data PDU arrived`) and aborts; nothing else is sent after the final response, and "
        "movescu and pynetdicom read the list and release normally.",
        "",
        *_status_table("C-GET"),
        "",
        "### 3.6 Modality Worklist SCP",
        "",
        "Answered from medrelay's worklist store (`engine.store.dicom.worklist.find_worklist`, filled from HL7 "
        "orders by the `hl7_to_worklist` transform). Statuses as for C-FIND.",
        "",
        "### 3.6.1 Modality Performed Procedure Step SCP",
        "",
        "N-CREATE and N-SET (PS3.4 F.7). N-CREATE needs the Type 1 attributes of PS3.4 Table F.7.2-1 "
        f"({', '.join(f'`{k}`' for k in mpps_scp.CREATE_TYPE1)}, and a Study Instance UID in each Scheduled "
        "Step Attributes item) and the status IN PROGRESS (a status sent in lower case or padded is taken "
        "and stored upper case, as CS requires); missing Type 2 attributes are accepted. N-SET may "
        "change the status to COMPLETED or DISCONTINUED once (both need the end date and time; COMPLETED a "
        "Performed Series Sequence with Series Instance UIDs) and may not change "
        f"{', '.join(f'`{k}`' for k in mpps_scp.NOT_SETTABLE)} (a different value is refused with 0x0106 "
        "naming it; the same value is not a change). After a final state every change is refused (0x0110, "
        "Error ID 0xA710); an N-SET that changes nothing (a retry) succeeds. The status is sent after the "
        "step, its message and its audit event are committed. The step (N-CREATE merged with every N-SET) "
        "is kept encrypted; the worklist items it names (Scheduled Step Attributes: accession number, then "
        "scheduled step id, requested procedure id or Study Instance UID) go to STARTED, COMPLETED or "
        "DISCONTINUED; Modality Worklist C-FIND offers SCHEDULED and STARTED items only, with their "
        "current Scheduled Procedure Step Status. Each N-CREATE / N-SET is also a message of the channel "
        "(header `event: mpps`) that routes with `when: {event: mpps}` send on (`mpps_to_hl7`: ORM^O01 / "
        "OMI^O23 order status; `mpps_to_fhir`: Procedure and ImagingStudy status).",
        "",
        "N-CREATE:",
        "",
        *_status_table("N-CREATE (MPPS)"),
        "",
        "N-SET:",
        "",
        *_status_table("N-SET (MPPS)"),
        "",
        "### 3.6.2 Storage Commitment Push Model SCP",
        "",
        "N-ACTION (Action Type 1, the well-known SOP Instance 1.2.840.10008.1.20.1.1) is answered at once; "
        "the result follows as an N-EVENT-REPORT (Event Type 1 all committed, 2 some failed) with the "
        "Transaction UID, Retrieve AE Title (`ae_title`), Referenced SOP Sequence and Failed SOP Sequence. An "
        "instance counts as committed when its index row is committed and its stored bytes open now "
        "(present and passing the AES-GCM check). The report goes on the requesting association while it is "
        "open (`storage_commitment.same_association`), otherwise on a new association to the AE configured "
        "for the requester's AE title in `storage_commitment.peers`, proposing SCP/SCU Role Selection with "
        "the SCP role (PS3.4 J.3.3), retried `retries` times `retry_delay` apart. A result not delivered "
        "before the engine stops is not kept: the requester asks again. Requests and results are audited.",
        "",
        *_status_table("N-ACTION (Storage Commitment)"),
        "",
        "Failure Reasons in the N-EVENT-REPORT:",
        "",
        *_status_table("N-EVENT-REPORT Failure Reason (Storage Commitment)"),
        "",
        "### 3.6.3 Patient Information Reconciliation and rejected instances (IOCM)",
        "",
        "- Patient updates (HL7 ADT A08 / A31, a FHIR Patient create or update) and merges (ADT A40 / A18, "
        "a FHIR Patient `link` of type `replaces`) routed through the `patient_update` transform to "
        "`{type: store}` change the archive's patient keyed by Patient ID and Issuer of Patient ID (PID-3.1 "
        "and PID-3.4.1; with `also_without_issuer` also the same Patient ID stored without an issuer): its "
        "name, birth date and sex as C-FIND and QIDO-RS return and match them (the old name no longer "
        "matches). A merge moves the prior patient's studies to the surviving patient (which takes the prior "
        "one's attributes when the archive did not know it) and removes the prior patient.",
        "- Stored instances are not rewritten: C-MOVE, C-GET, WADO-RS and WADO-URI send an instance of a "
        "patient changed since it was stored with its Patient module (Patient's Name, Patient ID, Issuer of "
        "Patient ID, Birth Date and Time, Sex, Other Patient IDs, Ethnic Group, Patient Comments) as the "
        "archive holds it now, the rest of the data set and the pixel data unchanged, in the stored transfer "
        "syntax (Specific Character Set ISO_IR 192 when a new value needs it). Instances of patients never "
        "changed are sent byte-identical. Instances that arrive after a merge with the prior Patient ID are "
        "filed under that ID again (a new patient).",
        "- A Key Object Selection Document whose Concept Name is a CID 7011 code "
        f"({', '.join(f'{c} {t}' for c, t in iocm.REJECTION_TITLES.items())}, scheme DCM), routed through the "
        "`iocm_rejection` transform to `{type: store}`, hides the instances of its Current Requested "
        "Procedure Evidence Sequence from C-FIND, C-MOVE, C-GET, DICOMweb and storage commitment (a series "
        "or study left empty goes too); with `delete: true` their stored bytes are also removed (their "
        "encryption key with them). The note itself stays in the archive. A rejected SOP Instance UID sent "
        "again is stored again.",
        "",
        "### 3.7 Storage SCU (`to: {type: dicom}` routes)",
        "",
        "Proposes one presentation context per (SOP class, transfer syntax of the stored instance) plus an "
        "uncompressed fallback; sends the stored data set without decoding, or converted (section 3.8) when "
        "the peer did not accept the stored syntax or `transfer_syntax` names another. One association is kept open "
        "across sends and released after `idle_release` seconds. Success and Warning (0xBxxx) statuses "
        f"count as delivered. Failures {permanent} are permanent (dead-lettered without retries); other "
        "failures, time-outs and aborted associations are retried with back-off.",
        "",
        "### 3.8 Transfer syntax conversion",
        "",
        "When a peer (C-GET requestor, C-MOVE destination, Storage SCU route with `transfer_syntax`, "
        "WADO-RS client) cannot take the stored syntax, the instance is converted with pydicom's pixel data "
        "handlers (decoding: pylibjpeg with libjpeg-turbo, libjpeg (JPEG-LS), OpenJPEG, RLE; encoding: "
        "OpenJPEG (JPEG 2000), RLE, CharLS via pyjpegls (JPEG-LS)). Preference: the stored syntax, then "
        "Explicit, then Implicit VR Little Endian, then lossless compressed (JPEG 2000, RLE, JPEG-LS). Lossy "
        "compression only with a configured `transfer_syntax` and `lossy_ratio`; it sets "
        "LossyImageCompression 01, LossyImageCompressionRatio and LossyImageCompressionMethod (PS3.3 "
        "C.7.6.1.1.5) and gives a new SOP Instance UID. Decompressing a lossy image keeps "
        "LossyImageCompression 01; decompression and lossless compression keep the SOP Instance UID. JPEG "
        "Baseline/Extended/Lossless, HTJ2K and Deflate are decoded but not encoded. Large instances (16 MiB "
        "and more, stored in authenticated chunks) that go out in their stored syntax (C-GET, C-MOVE, Storage "
        "SCU routes) are sent from their chunks as they are decrypted, never whole in memory; when its "
        "patient was updated since it was stored (Patient Information Reconciliation), only the elements "
        "before Pixel Data are rewritten. A large one converted to another syntax (C-GET, C-MOVE, Storage SCU "
        "routes, WADO-RS and WADO-URI) is converted frame by frame as its chunks are read: the header is "
        "re-encoded; each frame of encapsulated Pixel Data is decoded alone, each native frame read at its "
        "offset (rows x columns x samples x bits allocated / 8); to Explicit or Implicit VR Little Endian "
        "Pixel Data is written with its final length (frames x rows x columns x samples x bytes per sample), "
        "to RLE Lossless, JPEG 2000 or JPEG-LS each frame is encoded alone with the same encoder options as "
        "a whole conversion and Pixel Data is written with undefined length, an empty Basic Offset Table "
        "and one fragment per frame (PS3.5 A.4). Encapsulated frames are found by the Basic Offset Table, "
        "else the Extended Offset Table, else one fragment per frame when there are as many fragments as "
        "frames, else (JPEG, JPEG-LS, JPEG 2000) by the EOI/EOC marker ending each frame's last fragment "
        "when every frame starts with its SOI/SOC marker and their count is Number of Frames. Other "
        "conversions of a large instance (from big endian or deflated, fragments that are not frames, "
        f"1-bit pixel data) are done whole in memory, up to {codec.MAX_WHOLE_BYTES // (1024 * 1024)} MiB of "
        "data set; a larger one is not converted (a failed sub-operation, a failed delivery, 406 or a part "
        "left out).",
        "",
        "On ingest, a route's `dicom_transcode` transform (`transfer_syntax`, `lossy_ratio`, `on_failure`, "
        "`max_instance_bytes`) "
        "converts each instance the same way before its destination: before `to: {type: store}` the "
        "archive entry is replaced by the converted instance (e.g. JPEG 2000 lossless of what a modality "
        "sent uncompressed), which C-GET, C-MOVE and WADO-RS then serve; before a Storage SCU route it "
        "sends e.g. decompressed data sets. Instances already in the target syntax, and those without "
        "Pixel Data, are kept unchanged. A lossy target without `lossy_ratio` is a configuration error; "
        "a lossy result is a new instance (new SOP Instance UID, Lossy Image Compression set) next to "
        "the original. An instance that cannot be converted is dead-lettered with the reason "
        "(`on_failure: error`) or passed on as received and audited (`on_failure: keep`); so is one larger "
        "than `max_instance_bytes` (512 MiB by default: this transform holds the data set in memory, as "
        "received; a Storage SCU route's own `transfer_syntax` converts a large instance to an uncompressed "
        "syntax frame by frame instead).",
        "",
        *_conversion_table(),
        "",
        "## 4 Configuration",
        "",
        "### 4.1 Listener (`source: {type: dicom}`)",
        "",
        *_config_table(DicomSourceConfig),
        "",
        "`move_destinations` and `storage_commitment.peers` entries (`AE_TITLE: {...}`):",
        "",
        *_config_table(DicomPeer),
        "",
        "`storage_commitment`:",
        "",
        *_config_table(StorageCommitmentConfig),
        "",
        "### 4.2 Storage SCU (`to: {type: dicom}`)",
        "",
        *_config_table(DicomDestinationConfig),
        "",
        "### 4.3 Query/Retrieve SCU (`to: {type: dicom_prefetch}`)",
        "",
        *_config_table(DicomPrefetchConfig),
        "",
        "`sources` entries:",
        "",
        *_config_table(PrefetchSource),
        "",
        "## 5 Security",
        "",
        "- TLS (PS3.15 B.1 profiles, BCP 195 settings: TLS 1.2+, AEAD cipher suites) on the listener "
        "(`tls.cert`/`tls.key`, mutual TLS with `tls.ca` + `require_client_cert`) and on every outgoing "
        "association (`tls` of move destinations and routes). The listener's TLS handshake runs in the "
        "connection's own thread, bounded by `acse_timeout`; a failed handshake (no or untrusted client "
        "certificate, a peer not speaking TLS) is audited as a Security Alert, Node Authentication.",
        "- Listeners bind 127.0.0.1 unless `host` says otherwise; calling AE titles are an allow-list.",
        "- Stored instances are encrypted (AES-256-GCM, a data key per blob wrapped by the key-encryption "
        "key, AAD bound to the message id). File names are hashes of each blob's nonce and GCM tag, never UIDs.",
        "- The archive index keeps no PHI in clear: the patient key is a keyed HMAC-SHA-256 of Patient ID and "
        "issuer, Patient ID, Patient Name and Accession Number are searchable only as keyed HMAC terms "
        "(`dicom_terms`; what they reveal to someone holding the database alone is in docs/architecture.md), "
        "every returnable attribute of a patient, study and series is sealed JSON in the encrypted blob store "
        "and decrypted only for the candidate rows of a query. Clear columns hold UIDs, Modality, Study "
        "Date/Time, Series/Instance Number, the SOP Class and the instance's Rows, Columns, Number of Frames, "
        "Content Date/Time, Image Type and Acquisition Number (none of them PHI); UIDs, dates and Modality "
        "narrow queries in SQL.",
        "- Audit: association rejections (with the reason), every stored instance, queries and retrieves "
        "(C-MOVE / C-GET with the instances matched, sent and failed, counted from the sub-operations' "
        "responses), performed procedure steps (Procedure Record), storage commitment requests and results, "
        "patient updates and merges (Patient Record), rejection notes, and the queries and retrieves medrelay "
        "makes itself as an SCU are audit events (no PHI). The IHE actors and transactions: "
        "conformance/ihe-integration-statement.md.",
        "",
        *_dicomweb_section(),
    ]
    return "\n".join(out)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        return 0 if OUT.exists() and OUT.read_text() == text else 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
