"""`medrelay import`: load folders of DICOM, HL7 v2 or FHIR files into a running channel.

The files go in through the channel's own protocol (C-STORE, MLLP, FHIR REST), as a
modality, an HIS or an app would send them, so they get exactly the treatment live
traffic gets: the same checks, de-duplication, indexing, routes and audit trail, and an
answer per file. This is the migration path from another archive or interface engine.

HL7 files are split into messages by ``engine.hl7.message.split_file``, the shared
reader that also knows what may come before MSH (a UTF-8 byte order mark, blank lines)
and the batch protocol's envelope (FHS/BHS ... BTS/FTS, checked by ``engine.hl7.batch``),
and each message goes to the listener, whose shared decoding takes it or refuses it
exactly as the same message sent live.

Every file ends as accepted, rejected (the engine answered no: AE/AR, a DICOM failure
status, an HTTP 4xx) or skipped (not something this channel's protocol carries), and
every rejected or skipped one is named with its reason.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.hl7.ack import Ack, parse_ack
from engine.hl7.batch import is_batch, read_batch, read_batch_ack
from engine.hl7.message import TABLE_0357, HL7Error, read_header, split_file, wide_encoding
from engine.hl7.mllp import Frame, FrameParser, frame

Status = Literal["accepted", "rejected", "skipped"]
# Is there an HL7 message in the file at all (MSH and a field separator at a line start)?
# Only to tell "not HL7" apart; split_file does the splitting.
_HAS_MSH = re.compile(rb"(?:^|[\r\n])(?:\xef\xbb\xbf)?[ \t\r\n]*MSH[^A-Za-z0-9\r\n]")
IMPORT_AET = "MEDRELAY-IMPORT"


class ImportFailed(Exception):
    """The import cannot go on (engine unreachable, connection lost): one line, exit 4."""


class UsageProblem(Exception):
    """The command cannot work as asked (a calling AE the channel refuses): one line, exit 2."""


@dataclass(frozen=True)
class Outcome:
    path: Path
    status: Status
    detail: str  # the engine's answer, or why the file was skipped
    item: str = ""  # "message 2 (MSH-10 X)" when a file holds several messages


@dataclass
class Report:
    """What happened to each file (and each message of an HL7 file)."""

    outcomes: list[Outcome] = field(default_factory=list)
    progress: Callable[[int], object] = lambda n: None

    def add(self, path: Path, status: Status, detail: str, item: str = "") -> None:
        self.outcomes.append(Outcome(path, status, detail, item))
        self.progress(1)

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def all_accepted(self) -> bool:
        return bool(self.outcomes) and self.count("accepted") == len(self.outcomes)

    def problems(self) -> Iterator[str]:
        for o in self.outcomes:
            if o.status != "accepted":
                where = f"{o.path}" + (f" {o.item}" if o.item else "")
                yield f"{o.status}: {where}: {o.detail}"

    def summary(self) -> str:
        n_files = len({o.path for o in self.outcomes})
        return (f"{self.count('accepted')} accepted, {self.count('rejected')} rejected, "
                f"{self.count('skipped')} skipped ({len(self.outcomes)} items in {n_files} files)")


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and every file below folders named, in a stable order (hidden files skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(str(p))
    return out


def _head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of a file (a large DICOM file is never read whole to be named)."""
    with open(path, "rb") as f:
        return f.read(n)


def _is_dicom_file(path: Path) -> bool:
    """A Part-10 file (preamble and DICM): skipped by the HL7 and FHIR imports unread."""
    return _head(path, 132)[128:132] == b"DICM"


def describe(data: bytes) -> str:
    """What a file looks like, for the reason a channel of another protocol skips it."""
    if not data:
        return "an empty file"
    if data[128:132] == b"DICM":
        return "a DICOM file"
    body = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if body[:1] in (b"{", b"["):
        try:
            doc = json.loads(body)
        except ValueError:
            return "a broken JSON file"
        if isinstance(doc, dict) and isinstance(doc.get("resourceType"), str):
            return f"a FHIR JSON {doc['resourceType'][:64]}"
        return "a JSON file without resourceType"
    if body[:1] == b"<":
        return "an XML file (FHIR XML is not imported; use JSON)"
    if _HAS_MSH.search(data[:65536]):
        return "an HL7 v2 file"
    try:
        data[:65536].decode("utf-8")
    except UnicodeDecodeError:
        return "a binary file"
    return "a text file"


# -- HL7 v2 over MLLP -------------------------------------------------------------
def hl7_messages(data: bytes) -> list[bytes]:
    """Messages in one file: its MLLP frames if it is framed, else ``split_file``; [] when the
    file holds no HL7 v2 message at all (it is skipped, saying what it is).

    A malformed message is sent too: the engine answers it (AE/AR), which says more than
    a file silently shorter than it looked. So is a UTF-16 file, which the listener
    refuses naming its encoding.
    """
    if data[128:132] == b"DICM":  # binary that may hold a 0x0B or a CR-MSH by chance
        return []
    if data.lstrip(b" \t\r\n").startswith(b"\x0b"):
        return [ev.payload for ev in FrameParser(64 * 1024 * 1024).feed(data) if isinstance(ev, Frame)]
    if wide_encoding(data) is None and not _HAS_MSH.search(data):
        return []
    return split_file(data)


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ImportFailed(f"cannot reach the engine at {host}:{port} ({e.strerror or e}): "
                           "is `medrelay run` running with this channel?") from None


def _ack_detail(ack: bytes) -> tuple[Status, str]:
    try:
        a = parse_ack(ack)
    except HL7Error as e:
        return "rejected", f"unreadable answer: {e}"
    return _ack_detail_of(a)


def _ack_detail_of(a: Ack) -> tuple[Status, str]:
    if a.ok:
        return "accepted", a.code
    err = f" {a.error_code}" if a.error_code else ""
    name = TABLE_0357.get(int(a.error_code), "") if a.error_code.isdigit() else ""
    return "rejected", f"{a.code}{err}" + (f" ({name})" if name else "")


def _exchange(sock: socket.socket, parser: FrameParser, payload: bytes, where: str, timeout: float,
              host: str, port: int) -> bytes:
    """Send one frame and wait for its answer frame."""
    try:
        sock.sendall(frame(payload))
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ImportFailed(f"the engine closed the connection while {where} waited for its ACK")
            frames = [ev for ev in parser.feed(chunk) if isinstance(ev, Frame)]
            if frames:
                return frames[0].payload
    except TimeoutError:
        raise ImportFailed(f"no ACK within {timeout:g} s for {where}") from None
    except OSError as e:
        raise ImportFailed(f"connection to {host}:{port} lost: {e.strerror or e}") from None


def _item(msgs: list[bytes], n: int, msg: bytes) -> str:
    if len(msgs) <= 1:
        return ""
    cid = _control_id(msg)
    return f"message {n}" + (f" (MSH-10 {cid[:32]})" if cid else "")


def _control_id(msg: bytes) -> str:
    try:
        return read_header(msg, require=False).control_id
    except HL7Error:
        return ""


def _report_batch(f: Path, request: bytes, reply: bytes, report: Report) -> None:
    """A framed batch was sent whole: its batch ACK lists the messages in error (HL7 v2.5
    2.10.3); every other message of the batch was accepted."""
    if not is_batch(reply):  # refused whole with a plain ACK (an unreadable frame)
        status, detail = _ack_detail(reply)
        for n in range(1, len(read_batch(request).messages) + 1):
            report.add(f, status, detail, item=f"batch message {n}")
        return
    by_cid: dict[str, tuple[Status, str]] = {}
    anonymous: list[tuple[Status, str]] = []
    for a in read_batch_ack(reply):
        if isinstance(a, HL7Error):
            anonymous.append(("rejected", f"unreadable answer in the batch ACK: {a}"))
            continue
        status, detail = _ack_detail_of(a)
        if a.control_id:
            by_cid[a.control_id] = (status, detail)
        else:
            anonymous.append((status, detail))
    msgs = read_batch(request).messages
    for n, msg in enumerate(msgs, start=1):
        cid = _control_id(msg)
        if cid and cid in by_cid:
            status, detail = by_cid[cid]
        elif not cid and anonymous:
            status, detail = anonymous.pop(0)
        else:
            status, detail = "accepted", "accepted (not listed in the batch ACK)"
        report.add(f, status, detail, item=f"batch message {n}" + (f" (MSH-10 {cid[:32]})" if cid else ""))


def import_hl7(host: str, port: int, files: list[Path], report: Report, timeout: float = 30.0) -> None:
    """Send each message and wait for its ACK (MSA-1 AA/CA accepted, anything else rejected).

    A batch file (FHS/BHS ... BTS/FTS) as text is split like any file, the envelope segments
    left out, each message sent alone; a count in BTS-1 / FTS-1 that does not match what the
    file holds (a truncated file) is reported as a rejected item of the file. An MLLP-framed
    batch is sent as the frame it is and its batch ACK read.
    """
    sock = _connect(host, port, timeout)
    with sock:
        parser = FrameParser(64 * 1024 * 1024)
        for f in files:
            if _is_dicom_file(f):
                report.add(f, "skipped", "not HL7 v2: a DICOM file (no MSH segment)")
                continue
            data = f.read_bytes()
            framed = data.lstrip(b" \t\r\n").startswith(b"\x0b")
            msgs = hl7_messages(data)
            if not msgs:
                report.add(f, "skipped", f"not HL7 v2: {describe(data)} (no MSH segment)")
                continue
            if not framed and is_batch(data):
                for problem in read_batch(data).all_problems():
                    report.add(f, "rejected", problem, item="batch envelope")
            for n, msg in enumerate(msgs, start=1):
                item = _item(msgs, n, msg)
                where = f"{f} {item}".rstrip()
                reply = _exchange(sock, parser, msg, where, timeout, host, port)
                if framed and is_batch(msg):
                    _report_batch(f, msg, reply, report)
                else:
                    report.add(f, *_ack_detail(reply), item=item)


# -- DICOM C-STORE ------------------------------------------------------------------
def choose_calling_aet(source: Any, requested: str | None) -> str:
    """Our calling AE title: the one asked for, else MEDRELAY-IMPORT; refused before connecting
    when the channel's allow-list would reject it.

    We do not borrow a title from the allow-list: the audit trail would then say a
    modality (CT01) sent what an operator imported.
    """
    aet = requested or IMPORT_AET
    allowed = list(getattr(source, "calling_aets", []) or [])
    if getattr(source, "allow_any_calling_aet", False) or aet in allowed:
        return aet
    option = f"--calling-aet {aet}" if requested else "--calling-aet"
    raise UsageProblem(
        f"the channel accepts calling AE titles {', '.join(allowed) or '(none)'}; {aet} is not one of them: "
        f"add {aet} to its source's calling_aets (and reload the engine), or pass {option} with one "
        "of the allowed titles")


@contextmanager
def _pynetdicom_errors() -> Iterator[list[str]]:
    """pynetdicom's own words for a refused association, instead of its log lines on stderr."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    lg = logging.getLogger("pynetdicom")
    handler, level, propagate = Keep(logging.ERROR), lg.level, lg.propagate
    lg.addHandler(handler)
    lg.setLevel(logging.ERROR)
    lg.propagate = False
    try:
        yield lines
    finally:
        lg.removeHandler(handler)
        lg.setLevel(level)
        lg.propagate = propagate


@contextmanager
def _chunked_c_store() -> Iterator[None]:
    """pynetdicom sends a file's data set as it is encoded on disk, read in pieces of a PDU
    (``STORE_SEND_CHUNKED_DATASET``), instead of decoding the whole file and encoding it again:
    a 1 GiB instance costs this process a few MiB, not three copies. It needs a presentation
    context of the file's own transfer syntax, which is the one asked for below."""
    from pynetdicom import _config

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def import_dicom(host: str, port: int, called_aet: str, calling_aet: str, files: list[Path],
                 report: Report) -> None:
    """C-STORE each file in its own transfer syntax (0x0000 and warnings 0xB000-0xBFFF accepted),
    sent from disk in pieces (``_chunked_c_store``)."""
    from pydicom import dcmread
    from pynetdicom import AE

    metas = []
    for f in files:
        try:
            head = dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            meta = head.file_meta
            metas.append((f, *command_uids(head), str(meta.TransferSyntaxUID)))
        except Exception:
            data = _head(f, 65536)
            what = describe(data)
            reason = ("a DICOM file without SOP Class or Transfer Syntax in its file meta" if what == "a DICOM file"
                      else f"not DICOM: {what}")
            report.add(f, "skipped", reason)
    if metas:
        _connect(host, port, 10).close()  # a clear message when no engine listens there
    # at most 128 presentation contexts per association (PS3.8): one association per group
    pairs = sorted({(c, t) for _, c, _, t in metas})
    for i in range(0, len(pairs), 128):
        group = set(pairs[i:i + 128])
        ae = AE(ae_title=calling_aet)
        for c, t in group:
            ae.add_requested_context(c, [t])
        with _pynetdicom_errors() as why:
            assoc = ae.associate(host, port, ae_title=called_aet)
        if not assoc.is_established:
            said = "; ".join(x for x in why if x.startswith(("Reason", "Result"))) or "; ".join(why[-2:])
            verb = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "did not accept"
            raise ImportFailed(f"the engine at {host}:{port} {verb} the association (calling AE {calling_aet}, "
                               f"called AE {called_aet})" + (f": {said}" if said else ""))
        try:
            _bounded_sends(assoc)
            with _chunked_c_store():
                _send_group(assoc, group, metas, report)
        finally:
            if assoc.is_established:
                assoc.release()


SEND_DEPTH = 16  # P-DATA PDUs waiting in pynetdicom's send queue at most


def _bounded_sends(assoc: Any, depth: int = SEND_DEPTH) -> None:
    """Make pynetdicom's DIMSE wait while ``depth`` PDUs are queued for its socket thread.

    ``DIMSEServiceProvider.send_msg`` puts every P-DATA of a data set into the DUL's unbounded
    ``to_provider_queue`` as fast as it reads the file, so a chunked 1 GiB instance would be
    queued whole when the engine takes it slower than the disk gives it (measured: 321 MiB of
    peak RSS for 300 MiB). Waiting here bounds this process to ``depth`` PDUs; the wait ends
    when the DUL thread drains the queue or stops (connection lost: the C-STORE then fails)."""
    dul = assoc.dul
    send = dul.send_pdu

    def bounded(primitive: Any) -> None:
        while dul.to_provider_queue.qsize() >= depth and dul.is_alive():
            time.sleep(0.001)
        send(primitive)

    dul.send_pdu = bounded


def command_uids(head: Any) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) a file is sent under: the data set's, as STOW-RS and the
    file source store it (listeners.dicom_store.data_set_uids), over a file meta that names others
    (pydicom-edited results keep their source's Media Storage UIDs); the meta's when the data set
    has none (the listener then judges)."""
    meta = head.file_meta
    return (str(head.get("SOPClassUID", "") or "") or str(meta.MediaStorageSOPClassUID),
            str(head.get("SOPInstanceUID", "") or "") or str(meta.MediaStorageSOPInstanceUID))


@contextmanager
def _sent_as(sop_class: str, sop_uid: str) -> Iterator[None]:
    """pynetdicom's chunked send takes the command's Affected SOP Class/Instance UID from the
    file meta (``split_dataset``); for a file whose meta names other UIDs than its data set, the
    meta it reads here names the data set's, so the command matches the data set (the listener
    answers 0xA900 otherwise). The data set still goes from disk as encoded. One thread only:
    the import sends one file at a time."""
    from pynetdicom import association

    real = association.split_dataset

    def split(path: Any) -> Any:
        meta, offset = real(path)
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
        return meta, offset

    association.split_dataset = split
    try:
        yield
    finally:
        association.split_dataset = real


def _send_group(assoc: Any, group: set[tuple[str, str]], metas: list[tuple[Path, str, str, str]],
                report: Report) -> None:
    """C-STORE the files of one association's presentation contexts, each answer reported."""
    for f, c, uid, t in metas:
        if (c, t) not in group:
            continue
        try:
            with _sent_as(c, uid):
                status = assoc.send_c_store(f)
        except ValueError:  # no accepted presentation context for it
            report.add(f, "rejected", f"the engine accepted no presentation context for SOP class {c} "
                       f"in transfer syntax {t}")
            continue
        code = getattr(status, "Status", None)
        if code is None:
            report.add(f, "rejected", "no answer (association aborted or timed out)")
        elif code == 0:
            report.add(f, "accepted", "stored")
        elif 0xB000 <= code <= 0xBFFF:
            report.add(f, "accepted", f"stored with warning 0x{code:04X}")
        else:
            report.add(f, "rejected", f"status 0x{code:04X}")
        if not assoc.is_established:
            raise ImportFailed(f"the engine ended the association after {f}")


# -- FHIR REST ------------------------------------------------------------------------
def _operation_outcome(r: Any) -> str:
    try:
        issues = r.json().get("issue") or []
        text = "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code"))
                         for i in issues[:3])
    except (ValueError, AttributeError):
        text = ""
    return f"HTTP {r.status_code}" + (f": {text[:300]}" if text else "")


def import_fhir(base_url: str, token: str | None, files: list[Path], report: Report) -> None:
    """POST each resource (or transaction/batch Bundle) as JSON; 2xx accepted, else rejected."""
    import httpx

    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=60) as client:
        for f in files:
            if _is_dicom_file(f):
                report.add(f, "skipped", "not FHIR JSON: a DICOM file")
                continue
            body = f.read_bytes()
            try:
                res = json.loads(body)
                rtype = res["resourceType"]
                if not isinstance(rtype, str) or not rtype:
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                report.add(f, "skipped", f"not FHIR JSON: {describe(body)}")
                continue
            bundle = rtype == "Bundle" and res.get("type") in ("transaction", "batch")
            try:
                r = client.post("/" if bundle else f"/{rtype}", content=body)
            except httpx.ConnectError as e:
                raise ImportFailed(f"cannot reach the engine at {base_url} ({e}): is `medrelay run` running "
                                   "with this channel?") from None
            except httpx.HTTPError as e:
                raise ImportFailed(f"{base_url}: {type(e).__name__}: {e}") from None
            if r.status_code == 401:
                raise ImportFailed(f"{base_url} answered 401: the bearer token is missing or wrong "
                                   "(--token-env names the variable holding it)")
            if 200 <= r.status_code < 300:
                report.add(f, "accepted", f"HTTP {r.status_code}")
            else:
                report.add(f, "rejected", _operation_outcome(r))
