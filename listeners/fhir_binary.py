"""FHIR ``Binary`` over REST (R4 binary.html): raw bodies in, raw bytes or the resource out.

Content negotiation as the specification has it: a read whose Accept (or ``_format``) asks
for FHIR JSON gets the Binary resource with ``data`` in base64; any other read gets the
bytes themselves with the Binary's contentType (an Accept naming another type is 406). A
create or update whose Content-Type is not FHIR JSON is the content itself.

A raw read honours one byte range (``Range: bytes=a-b``, 206; pdf.js asks for them on large
PDFs). Both directions stream: a raw body is read in the pieces the server hands over, within
``max_binary_bytes`` (413 OperationOutcome past it) and the listener's body budget, each
piece encrypted as it arrives into a blob of its own (engine.store.fhir.binary); a read sends the
blob's chunks as they are decrypted (``Store.blob_chunks``), base64-encoded on the fly for
the JSON form. Memory stays about the size of one body for an upload and a few chunks for a
download, never the JSON of a 50 MiB document.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from engine.store.fhir import binary
from engine.store.fhir.params import FhirError
from engine.store.fhir.resources import DATA_TYPES, FhirStore
from listeners.fhir_body import BodyBudget, reserve_body

# A raw body over this is sealed while it arrives, by one of SEAL_THREADS (their own pool, so a
# slow uploader holds one of these, never a thread the reads need); a smaller one once complete.
STREAM_SEAL_MIN = 1024 * 1024
SEAL_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fhir-binary-seal")
FHIR_JSON_TYPES = ("application/fhir+json", "application/json+fhir", "application/json", "text/json")
CONTENT_TYPE = "application/fhir+json; charset=utf-8"
MEDIA_TYPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$&^_.+-/;= \"*")


def is_data_type(rtype: str) -> bool:
    return rtype in DATA_TYPES


def _media(value: str) -> str:
    return value.split(";")[0].strip().lower()


def wants_resource(request: Request) -> bool:
    """Accept or ``_format`` asks for FHIR JSON (then the resource, else the raw bytes)."""
    fmt = request.query_params.get("_format", "")
    if fmt and "json" in fmt:
        return True
    return any(_media(a) in FHIR_JSON_TYPES for a in request.headers.get("accept", "").split(","))


def check_raw_accept(request: Request, content_type: str) -> None:
    """406 unless Accept is absent, ``*/*``, ``type/*`` or the Binary's own type."""
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return
    own = _media(content_type)
    for a in accept.split(","):
        m = _media(a)
        if m in ("*/*", own) or (m.endswith("/*") and own.startswith(m[:-1])):
            return
    raise FhirError(406, "not-supported", "this Binary is available as its own contentType or as "
                                          "application/fhir+json")


def servable_type(content_type: object) -> str:
    """The Content-Type a raw read is served with: the Binary's contentType when it is a media
    type a header can carry, else application/octet-stream. A FHIR ``code`` may hold any
    non-space characters ("text/plain\u4e00" from a JSON create), which the HTTP stack cannot
    encode: that read was a 500, the stored bytes unreadable raw."""
    ctype = " ".join(str(content_type or "").split())
    if not ctype or len(ctype) > 255 or not set(ctype) <= MEDIA_TYPE_CHARS:
        return "application/octet-stream"
    return ctype


def raw_read_guard(content_type: str) -> dict[str, str]:
    """Headers that keep a raw read's bytes from running as this origin's page.

    The bytes are whatever an authorised client uploaded: an HTML, SVG or XHTML document, or
    XML with a stylesheet, would otherwise run its script same-origin with the FHIR API (and,
    with a cookie or a token in the page's storage, act as the reader). ``nosniff`` stops a
    browser from guessing active content in a passive type; ``Content-Security-Policy:
    sandbox`` gives an active type a unique opaque origin with scripts, forms and plugins off.
    It is sent on every raw read except PDF: a list of "active" types would miss some (XSLT,
    MathML, vendor +xml types). A browser's built-in PDF viewer is a plugin, which ``sandbox``
    turns off (the document would not show), and a PDF's script runs inside that viewer, not as
    the origin: PDF keeps ``nosniff`` only."""
    guard = {"X-Content-Type-Options": "nosniff"}
    if _media(content_type) != "application/pdf":
        guard["Content-Security-Policy"] = "sandbox"
    return guard


def raw_content_type(request: Request) -> str | None:
    """The upload's content type when the body is the content itself (None: a FHIR JSON body)."""
    ctype = request.headers.get("content-type", "").strip()
    if not ctype or _media(ctype) in FHIR_JSON_TYPES:
        return None
    if len(ctype) > 255 or not set(ctype) <= MEDIA_TYPE_CHARS:
        raise FhirError(400, "invalid", "Content-Type is not a media type")
    return " ".join(ctype.split())


async def receive(request: Request, sealer: binary.PieceSealer, *, limit: int, budget: BodyBudget,
                  wait: float) -> binary.SealedData:
    """The raw body sealed into its blob as it arrives, within ``limit`` (413 past it).

    Past STREAM_SEAL_MIN each piece goes to a sealing thread at once, so only the ciphertext
    accumulates. The
    budget reservation (the declared length, or the limit when chunked; capped at the budget
    itself) is released by ``release_body`` in the endpoint's ``finally``; an upload given up
    (413, the client gone) stops the thread and leaves no file."""
    await reserve_body(request, limit=limit, budget=budget, wait=wait, most=budget.limit)
    task: asyncio.Future[binary.SealedData] | None = None
    try:
        async for chunk in request.stream():
            if sealer.received + len(chunk) > limit:
                raise FhirError(413, "too-long", f"body larger than {limit} bytes")
            if chunk:
                sealer.put(chunk)
            if task is None and sealer.received > STREAM_SEAL_MIN:
                task = asyncio.get_running_loop().run_in_executor(SEAL_THREADS, sealer.run)
        sealer.close()
        if task is None:  # a small body, complete: sealed in one short call
            return await run_in_threadpool(sealer.run)
        return await task
    except BaseException:
        sealer.abort()
        if task is not None:
            with contextlib.suppress(Exception):
                sealed = await asyncio.shield(task)
                if sealed.file_written:  # it finished before the abort arrived: nothing refers to it
                    await run_in_threadpool(sealer.store.delete_blob_files, [sealed.blob_id])
        raise


def read_response(fs: FhirStore, conn: Any, request: Request, rtype: str, rid: str, version: int,
                  body: dict[str, Any], headers: dict[str, str]) -> Response:
    """The read of a Binary version: its bytes, or the resource with them as base64 (both streamed)."""
    data = fs.data_of(conn, rtype, rid, version)
    content_type = servable_type(body.get("contentType"))
    if wants_resource(request):
        doc = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        if data is None:
            return Response(doc, 200, headers={**headers, "Content-Type": CONTENT_TYPE})
        return StreamingResponse(binary.json_with_data(doc, binary.chunks(conn, fs.store, data)), 200,
                                 headers={**headers, "Content-Type": CONTENT_TYPE})
    check_raw_accept(request, content_type)
    out = {**headers, **raw_read_guard(content_type), "Content-Type": content_type, "Accept-Ranges": "bytes"}
    if data is None:
        return Response(b"", 200, headers=out)
    if request.method == "HEAD":  # the headers only: nothing to decrypt
        return Response(b"", 200, headers={**out, "Content-Length": str(data.size)})
    span = byte_range(request.headers.get("range", ""), data.size)
    if span == "unsatisfiable":
        return Response(b"", 416, headers={**headers, "Content-Range": f"bytes */{data.size}"})
    if isinstance(span, tuple):
        start, end = span
        out["Content-Range"] = f"bytes {start}-{end}/{data.size}"
        out["Content-Length"] = str(end - start + 1)
        return StreamingResponse(_window(binary.chunks(conn, fs.store, data), start, end + 1), 206, headers=out)
    out["Content-Length"] = str(data.size)
    return StreamingResponse(_iterate(binary.chunks(conn, fs.store, data)), 200, headers=out)


def byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=a-b`` / ``a-`` / ``-n`` range (RFC 9110 14.1.2) as (first, last); None: send it
    all (no header, another unit, several ranges, a malformed one); "unsatisfiable": 416."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or not spec or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first or last) or (first and not _ascii_digits(first)) \
            or (last and not _ascii_digits(last)):
        return None
    if not first:  # the final n bytes
        n = _position(last)
        return (max(0, size - n), size - 1) if n and size else "unsatisfiable"
    start = _position(first)
    if start >= size:
        return "unsatisfiable"
    end = min(_position(last), size - 1) if last else size - 1
    return (start, end) if end >= start else None


def _ascii_digits(text: str) -> bool:
    """ASCII 0-9 only: ``str.isdigit`` also takes "²" or Arabic-Indic digits (Starlette decodes
    headers as Latin-1), which ``int`` then refuses."""
    return text.isascii() and text.isdigit()


def _position(digits: str) -> int:
    """A byte position from the header, capped (a peer's 5 000 digits pass Python's int limit;
    anything past 2**63 is past every blob)."""
    return int(digits) if len(digits) <= 19 else 1 << 63


def _iterate(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks as they are authenticated; a failure mid-stream ends the response short (the
    client sees fewer bytes than Content-Length), since the status is out already."""
    yield from chunks


def _window(chunks: Iterator[bytes], start: int, stop: int) -> Iterator[bytes]:
    """Bytes [start, stop) of the stream. Chunks before it are decrypted and dropped (each one is
    authenticated in order, and a chunk cannot be opened on its own here), so memory stays one chunk."""
    pos = 0
    for chunk in chunks:
        end = pos + len(chunk)
        if end > start:
            yield bytes(memoryview(chunk)[max(0, start - pos):min(len(chunk), stop - pos)])
        pos = end
        if pos >= stop:
            return
