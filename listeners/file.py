"""`source: {type: file}`: take HL7 v2, DICOM Part 10 and FHIR JSON files from a folder (or SFTP).

A file counts once it is complete (``ready``: its size and time unchanged for
``stable_seconds``, a ``<name>.done`` marker beside it, or at once for senders that write
under a hidden name and rename), then goes through intake like any message (what it is
comes from its content: listeners/ingest.py), and only after the commit is it moved to
``done_path`` / ``error_path`` or deleted.

The claim protocol (why a kill -9 at any moment neither loses a file nor takes one twice):

1. **claim**: a random claim id is made (time-ordered), a small record naming the file is
   written (synced) as ``.medrelay-inflight/<claim>.json``, then the file is renamed to
   ``.medrelay-inflight/<claim>`` and the folder synced. The rename is atomic: the file is
   either still in the folder (nothing happened) or claimed. Two claimers cannot both
   win it.
2. **commit**: each message of the file is submitted with a mark ``<claim>:<n>``
   (engine/store/sources.py) written in the same intake transaction as the message.
3. **finish**: after the commit the file is moved to ``done_path`` (or deleted, or moved
   to ``error_path`` with a ``.error.txt`` report beside it), then its marks and its claim
   record go.

At start every claim still in ``.medrelay-inflight/`` is submitted again: what had been
committed is answered as a duplicate by its mark (and by intake's MSH-3/4/10 dedupe),
what had not is committed now; then it is finished. A claim record without its file
(the crash came after the move) is just removed.

File names decide nothing but the order files are taken in: they never become storage
names, message headers, peers or log fields (a name may well hold a patient's name).
Log lines carry the claim id, which the error report repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import heapq
import json
import os
import posixpath
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field, field_validator

from engine.components import field_of
from engine.context import ComponentContext
from engine.envelope import Kind
from engine.registry import component
from engine.store import sources
from listeners.file_folder import Entry, Folder, LocalFolder, TooLarge
from listeners.file_sftp import SftpConfig
from listeners.hl7_receive import Hl7Receiver
from listeners.ingest import DicomIngest, FhirIngest, IngestConfig, describe, detect, marking, unframe

log = structlog.get_logger()

INFLIGHT = ".medrelay-inflight"
RETRY_DELAY = (1.0, 60.0)  # a file whose commit failed for the engine's reasons is tried again
MARK_AGE = 30 * 86400.0  # marks of finished claims left by a crash are pruned after this


class FileSourceConfig(IngestConfig):
    """Take HL7 v2 (messages, batches), DICOM Part 10 and FHIR JSON files from a folder, local or SFTP."""

    type: Literal["file"]
    path: str = Field(description="the folder watched (relative: to the YAML file; with `sftp`: on the server, "
                      "relative to the login folder). Files directly in it; subfolders are not looked into")
    pattern: str = Field("*", description="shell pattern the file names must match, e.g. \"*.hl7\" (names "
                         "starting with '.' are never taken: write under such a name and rename when done)")
    ready: Literal["stable", "marker", "immediate"] = Field(
        "stable", description="when a file is complete: stable = size and time unchanged for stable_seconds; "
        "marker = a file named <name><marker_suffix> exists beside it (removed with the claim); "
        "immediate = at once (the sender renames complete files into the folder)")
    stable_seconds: float = Field(2.0, ge=0, description="ready: stable: seconds a file must stay unchanged")
    marker_suffix: str = Field(".done", min_length=1, description="ready: marker: the marker's suffix")
    after: Literal["move", "delete"] = Field(
        "move", description="once committed: move to done_path, or delete (files in error always go to error_path)")
    done_path: str | None = Field(None, description="where committed files go (default <path>/done; relative: "
                                  "to path). A name taken there gets the claim id before its extension")
    error_path: str | None = Field(None, description="where refused files go with a <name>.error.txt report "
                                   "(default <path>/error; relative: to path)")
    poll_interval: float = Field(1.0, gt=0, le=3600, description="seconds between looks at the folder")
    order: Literal["mtime", "name"] = Field("mtime", description="the order files are taken in: oldest first "
                                            "(then by name), or by name")
    max_file_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="largest file taken (read whole into "
                                "memory, one file at a time); larger ones go to error_path unread")
    max_files_per_poll: int = Field(1000, ge=1, description="files considered per look (a folder of a million "
                                    "files costs this much memory, not a million entries)")
    accept: list[Kind] = field_of(IngestConfig, "accept",
                                  description="kinds taken (hl7v2, dicom, fhir); others go to error_path")
    calling_ae_title: str = field_of(IngestConfig, "calling_ae_title", default="FILE")
    sftp: SftpConfig | None = Field(None, description="watch a folder on an SFTP server instead of a local one")

    @field_validator("pattern")
    @classmethod
    def _no_folders(cls, v: str) -> str:
        if "/" in v or not v:
            raise ValueError("pattern matches file names, not paths")
        return v

    def environment_problems(self, settings: Any) -> list[tuple[tuple[str, ...], str]]:
        """What `medrelay check` reports: folders missing or not writable (local folders only)."""
        if self.sftp is not None:
            return self.sftp.environment_problems(settings)
        out: list[tuple[tuple[str, ...], str]] = []
        root = settings.resolve(self.path)
        if not root.is_dir():
            return [(("path",), f"folder not found: {root}")]
        if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
            out.append((("path",), f"folder not readable and writable by this user: {root}"))
        for attr in ("done_path", "error_path"):
            p = _under(root, getattr(self, attr), "done" if attr == "done_path" else "error")
            probe = p if p.exists() else p.parent
            if p.exists() and not p.is_dir():
                out.append(((attr,), f"not a folder: {p}"))
            elif not probe.exists() or not os.access(probe, os.W_OK | os.X_OK):
                out.append(((attr,), f"folder cannot be created or written: {p}"))
        return out


def _under(root: Path, p: str | None, default: str) -> Path:
    if not p:
        return root / default
    q = Path(p)
    return q if q.is_absolute() else root / q


@dataclass
class _Claim:
    id: str
    name: str  # the file's name in the folder (to move it back under it, nothing else)
    size: int = 0
    tries: int = 0
    not_before: float = 0.0


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float


@dataclass
class _Verdict:
    """What became of one file: done, refused (to error_path) or retry (kept in flight)."""

    state: Literal["done", "error", "retry"]
    lines: list[str] = field(default_factory=list)  # the error report, no PHI


class FileListener:
    """Polls one folder; files are claimed, committed and finished one at a time, in order."""

    def __init__(self, config: FileSourceConfig, ctx: ComponentContext) -> None:
        if ctx.intake is None:
            raise ValueError("the file source needs the engine intake")
        self.config = config
        self.ctx = ctx
        self.channel = ctx.channel
        if config.sftp is not None:
            from listeners.file_sftp import SftpFolder

            self.folder: Folder = SftpFolder(config.sftp, ctx.settings.base_dir)
            root = config.path.rstrip("/") or "."
        else:
            root = str(ctx.settings.resolve(config.path))
            self.folder = LocalFolder(root)
        self.root = root
        self.inflight = posixpath.join(root, INFLIGHT)
        self.done_dir = self._dir(config.done_path, "done")
        self.error_dir = self._dir(config.error_path, "error")
        for d in (self.done_dir, self.error_dir):
            if posixpath.normpath(d) == posixpath.normpath(root):
                raise ValueError("done_path and error_path must not be the watched folder itself")
        self.hl7 = Hl7Receiver(ctx, accept_versions=config.accept_versions,
                               accept_processing_ids=config.accept_processing_ids)
        self.fhir = FhirIngest(ctx, mode=config.fhir, max_bytes=config.max_file_bytes)
        self.dicom = DicomIngest(ctx, ae_title=config.ae_title, calling_aet=config.calling_ae_title)
        self._seen: dict[str, _Seen] = {}
        self._claims: list[_Claim] = []  # claimed, not finished (retry later)
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.serving = False
        self._prepared = False
        self.counts = {"done": 0, "error": 0, "retry": 0}

    def _dir(self, p: str | None, default: str) -> str:
        if not p:
            return posixpath.join(self.root, default)
        return p if posixpath.isabs(p) else posixpath.join(self.root, p)

    @property
    def address(self) -> tuple[str, int]:
        if self.config.sftp is not None:
            return self.config.sftp.host, self.config.sftp.port
        return "file", 0

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        """A local folder is checked and recovered now (a missing folder or a second engine on it
        stops the start); an SFTP folder on the first look that reaches the server, so a server
        that is down or refuses us does not keep the rest of the engine from starting."""
        from engine.runtime import StartError

        if isinstance(self.folder, LocalFolder):
            if not os.path.isdir(self.root):
                raise StartError(f"channel {self.channel}: folder not found: {self.root}")
            try:
                await self._prepare()
            except RuntimeError as e:
                await self.folder.close()
                raise StartError(f"channel {self.channel}: {e} ({self.root})") from None
            except BaseException:
                await self.folder.close()
                raise
        self.serving = True
        self._task = asyncio.create_task(self._run(), name=f"file-{self.channel}")
        log.info("file.watching", channel=self.channel, remote=self.config.sftp is not None,
                 ready=self.config.ready, pattern=self.config.pattern, in_flight=len(self._claims))

    async def _prepare(self) -> None:
        """The claim folder (and the lock on it), done/ and error/, then the claims left in flight."""
        if self._prepared:
            return
        await self.folder.open()
        await self.folder.mkdir(self.inflight)
        if isinstance(self.folder, LocalFolder):
            await asyncio.to_thread(self.folder.lock, posixpath.join(self.inflight, ".lock"))
        for d in (self.done_dir, self.error_dir):
            await self.folder.mkdir(d)
        await self._recover()
        self._prepared = True

    async def stop(self) -> None:
        """No new claim; the file being committed finishes (intake stops after the listeners)."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
        self.serving = False
        await self.folder.close()

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                await self.poll()
                failures = 0
                delay = self.config.poll_interval
            except Exception as e:  # the folder is away (unmounted, SFTP down): try again, bounded
                failures += 1
                delay = min(self.config.poll_interval * 2 ** min(failures, 6), 60.0)
                log.warning("file.poll_failed", channel=self.channel, error=type(e).__name__,
                            detail=str(e)[:200] if not isinstance(e, OSError) else e.strerror, retry_in=delay)
                if self.config.sftp is not None:
                    await self.folder.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)

    # -- one look at the folder ----------------------------------------------------
    async def poll(self) -> int:
        """Finish claims that wait for a retry, then claim and commit what is ready; how many finished."""
        await self._prepare()
        await self.folder.open()
        n = 0
        now = time.monotonic()
        for c in list(self._claims):
            if self._stop.is_set():
                return n
            if c.not_before <= now:
                n += await self._process(c)
        for entry in await self._ready():
            if self._stop.is_set():
                break
            claim = await self._claim(entry)
            if claim is not None:
                n += await self._process(claim)
        return n

    async def _ready(self) -> list[Entry]:
        cfg = self.config
        entries = await self.folder.files(self.root)
        names = {e.name for e in entries}
        suffix = cfg.marker_suffix
        cands = [e for e in entries if fnmatch.fnmatchcase(e.name, cfg.pattern)
                 and not (cfg.ready == "marker" and e.name.endswith(suffix))]
        key = (lambda e: (e.mtime_ns, e.name)) if cfg.order == "mtime" else (lambda e: (e.name,))
        cands = heapq.nsmallest(cfg.max_files_per_poll, cands, key=key)
        now = time.monotonic()
        ready = []
        seen: dict[str, _Seen] = {}
        for e in cands:
            if cfg.ready == "marker":
                if e.name + suffix in names:
                    ready.append(e)
                continue
            if cfg.ready == "immediate":
                ready.append(e)
                continue
            s = self._seen.get(e.name)
            if s is None or (s.size, s.mtime_ns) != (e.size, e.mtime_ns):
                s = _Seen(e.size, e.mtime_ns, now)
            seen[e.name] = s
            if now - s.since >= cfg.stable_seconds:
                ready.append(e)
        self._seen = seen  # names no longer there are forgotten: memory follows the folder
        return ready

    # -- the claim protocol ------------------------------------------------------
    async def _claim(self, entry: Entry) -> _Claim | None:
        claim = _Claim(id=f"{time.time_ns():016x}-{secrets.token_hex(6)}", name=entry.name, size=entry.size)
        record = json.dumps({"name": entry.name, "claimed_at": time.time(), "size": entry.size}).encode()
        rec_path = posixpath.join(self.inflight, claim.id + ".json")
        await self.folder.write(rec_path, record)
        try:
            await self.folder.rename(posixpath.join(self.root, entry.name), posixpath.join(self.inflight, claim.id))
        except FileNotFoundError:  # gone meanwhile (the sender took it back, another claimer)
            await self.folder.unlink(rec_path)
            return None
        if self.config.ready == "marker":
            await self.folder.unlink(posixpath.join(self.root, entry.name + self.config.marker_suffix))
        await self.folder.sync(self.root)
        await self.folder.sync(self.inflight)
        self._seen.pop(entry.name, None)
        log.info("file.claimed", channel=self.channel, claim=claim.id, bytes=entry.size)
        return claim

    async def _recover(self) -> None:
        """Claims a previous run left in flight: submitted again (marks answer what was committed)."""
        await self.folder.remove_temporaries(self.inflight)  # half-written records of a killed run
        entries = {e.name: e for e in await self.folder.files(self.inflight)}
        records = sorted(n[:-5] for n in entries if n.endswith(".json") and not n.startswith("."))
        recovered = 0
        for cid in records:
            data = entries.get(cid)
            rec_path = posixpath.join(self.inflight, cid + ".json")
            if data is None:  # finished before the crash; only the record was left
                await self._forget(cid)
                await self.folder.unlink(rec_path)
                continue
            name = cid
            with contextlib.suppress(Exception):
                name = str(json.loads(await self.folder.read(rec_path, 1 << 20))["name"]) or cid
            if self.config.ready == "marker":
                await self.folder.unlink(posixpath.join(self.root, name + self.config.marker_suffix))
            self._claims.append(_Claim(cid, posixpath.basename(name), data.size))
            recovered += 1
        for n, e in entries.items():  # a file in flight without its record cannot come from a claim
            if not n.endswith(".json") and not n.startswith(".") and n not in records:
                self._claims.append(_Claim(n, n, e.size))
                recovered += 1
        if recovered:
            log.warning("file.recovering", channel=self.channel, claims=recovered)
        await asyncio.to_thread(self._prune_marks)

    def _prune_marks(self) -> None:
        with self.ctx.store.engine.begin() as conn:
            sources.prune_marks(conn, self.channel, time.time() - MARK_AGE)

    async def _forget(self, cid: str) -> None:
        def work() -> None:
            with self.ctx.store.engine.begin() as conn:
                sources.unmark_prefix(conn, self.channel, cid + ":")

        try:
            await asyncio.to_thread(work)
        except Exception as e:  # harmless: a claim id is never used again; pruned by age
            log.warning("file.unmark_failed", channel=self.channel, claim=cid, error=type(e).__name__)

    async def _process(self, claim: _Claim) -> int:
        """Commit one claimed file and finish it; a retry keeps it in flight with a backoff."""
        if claim not in self._claims:
            self._claims.append(claim)
        t0 = time.perf_counter()
        try:
            verdict = await self._commit(claim)
        except Exception as e:
            log.exception("file.commit_failed", channel=self.channel, claim=claim.id)
            verdict = _Verdict("retry", [f"internal error: {type(e).__name__}"])
        if verdict.state == "retry":
            claim.tries += 1
            delay = min(RETRY_DELAY[0] * 2 ** min(claim.tries - 1, 10), RETRY_DELAY[1])
            claim.not_before = time.monotonic() + delay
            self.counts["retry"] += 1
            log.warning("file.retry_later", channel=self.channel, claim=claim.id, tries=claim.tries,
                        retry_in=delay, reason=verdict.lines[:1])
            return 0
        await self._finish(claim, verdict)
        self._claims.remove(claim)
        self.counts[verdict.state] += 1
        log.info("file.finished", channel=self.channel, claim=claim.id, state=verdict.state,
                 ms=round((time.perf_counter() - t0) * 1000, 1))
        return 1

    async def _commit(self, claim: _Claim) -> _Verdict:
        path = posixpath.join(self.inflight, claim.id)
        limit = self.config.max_file_bytes
        # a DICOM instance refused before the Storage SCP is audited as the SCP audits its refusals: a
        # DICOM file this channel does not take, and, on a channel that takes DICOM only, any file
        dicom_only = self.config.accept == ["dicom"]
        if claim.size > limit:
            if dicom_only:
                await self._refuse_dicom(b"", f"larger than max_file_bytes ({limit}): not read")
            return _Verdict("error", [f"larger than max_file_bytes ({limit}): not read"])
        try:
            data = await self.folder.read(path, limit)
        except TooLarge:
            if dicom_only:
                await self._refuse_dicom(b"", f"larger than max_file_bytes ({limit}): not read")
            return _Verdict("error", [f"larger than max_file_bytes ({limit}): not read"])
        kind = detect(data)
        if kind is None:
            if dicom_only:
                await self._refuse_dicom(data, "not a DICOM Part-10 file (no DICM prefix at offset 128)")
            return _Verdict("error", [f"not HL7 v2, DICOM Part 10 or FHIR JSON: {describe(data)}"])
        if kind not in self.config.accept:
            if kind == "dicom":
                await self._refuse_dicom(data, "DICOM is not taken by this channel")
            return _Verdict("error", [f"a {kind} file; this channel takes {', '.join(self.config.accept)}"])
        peer = self.folder.peer
        if kind == "dicom":
            a = await asyncio.to_thread(self.dicom.store, data, peer)
            if a.ok:
                return _Verdict("done")
            line = f"DICOM status 0x{a.status:04X}: {a.comment or 'refused'}"
            return _Verdict("retry" if a.retryable else "error", [line])
        if kind == "fhir":
            f = await self.fhir.submit(data, peer, mark=f"{claim.id}:0")
            if f.ok:
                return _Verdict("done")
            issues = (f.outcome or {}).get("issue") or [{}]
            line = f"FHIR {f.status} {issues[0].get('code', '')}: {issues[0].get('diagnostics', '')}"[:300]
            return _Verdict("retry" if f.retryable else "error", [line])
        result = await self.hl7.receive_all(unframe(data), peer, hook=lambda i: marking(
            self.channel, f"{claim.id}:{i}"))
        if not result.answers:
            return _Verdict("error", ["no HL7 v2 message in the file"])
        if result.retryable:
            return _Verdict("retry", ["a message could not be stored (engine side); the file is tried again"])
        lines = [f"batch: {p}" for p in result.problems]
        for i, a in enumerate(result.answers, start=1):
            if not a.ok:
                lines.append(f"message {i}" + (f" (MSH-10 {a.control_id[:40]})" if a.control_id else "")
                             + f": {a.reason}")
        return _Verdict("done" if not lines else "error", lines)

    async def _refuse_dicom(self, data: bytes, reason: str) -> None:
        await asyncio.to_thread(self.dicom.refuse, data, self.folder.peer, reason)

    async def _finish(self, claim: _Claim, verdict: _Verdict) -> None:
        src = posixpath.join(self.inflight, claim.id)
        if verdict.state == "done" and self.config.after == "delete":
            await self.folder.unlink(src)
        else:
            where = self.done_dir if verdict.state == "done" else self.error_dir
            name = await self._free_name(where, claim)
            if verdict.state == "error":
                report = "\n".join([f"medrelay: channel {self.channel}, claim {claim.id}: not taken",
                                    *verdict.lines, ""])
                await self.folder.write(posixpath.join(where, name + ".error.txt"), report.encode())
            await self.folder.move(src, posixpath.join(where, name))
            await self.folder.sync(where)
        await self.folder.sync(self.inflight)
        await self._forget(claim.id)
        await self.folder.unlink(posixpath.join(self.inflight, claim.id + ".json"))

    async def _free_name(self, where: str, claim: _Claim) -> str:
        name = claim.name or claim.id
        if await self.folder.stat(posixpath.join(where, name)) is None:
            return name
        stem, dot, ext = name.rpartition(".")
        return f"{stem}.{claim.id}.{ext}" if dot and stem else f"{name}.{claim.id}"


@component("source", "file", config=FileSourceConfig)
def build(config: FileSourceConfig, ctx: ComponentContext) -> FileListener:
    """Folder (or SFTP) reader: HL7 v2, DICOM Part 10, FHIR JSON files, committed then moved or deleted."""
    return FileListener(config, ctx)
