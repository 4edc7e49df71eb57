"""Request bodies of the FHIR listener: bounded per request and in total, parsed off the loop.

Per request, ``max_body_bytes``: a declared Content-Length over it gets 413 before any
byte is read, a streamed (chunked) body as soon as it passes it. In total, the
``BodyBudget``: every request reserves its whole size (Content-Length, or the maximum
when chunked) before reading, so 200 clients each sending 16 MiB cannot make the
engine hold 3 GiB; a request that does not fit waits for others to finish, then gets
503. Reserving the whole size at once (not chunk by chunk) means two half-read bodies
can never wait for each other.

Parsing and validating a large body takes CPU and memory (json.loads builds 7-25 bytes
of objects per byte, engine.store.fhir.jsontext bounds it): it runs in a worker thread,
never on the event loop that serves every other connection, and requests with a body
over HEAVY_BYTES go one at a time from parsing to response (``HeavyGate``), so only one
parsed large body is alive at once.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from engine.store.fhir.params import FhirError

HEAVY_BYTES = 256 * 1024
RETRY_AFTER = "5"


class BodyBudget:
    """Bytes of request bodies in memory at once, shared by one listener's connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    async def reserve(self, n: int, timeout: float) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.used + n <= self.limit), timeout)
            except TimeoutError:
                raise FhirError(503, "transient", "the server is busy receiving other requests; retry later",
                                headers={"Retry-After": RETRY_AFTER}) from None
            self.used += n

    async def release(self, n: int) -> None:
        if n <= 0:
            return
        async with self._changed:
            self.used -= n
            self._changed.notify_all()


async def reserve_body(request: Request, *, limit: int, budget: BodyBudget, wait: float,
                       most: int | None = None) -> None:
    """Check the declared Content-Length against ``limit`` (413 before any byte is read) and reserve
    the body's share of ``budget``: the declared length, or ``limit`` when chunked, at most ``most``.
    Released by ``release_body`` (the endpoint's ``finally``)."""
    length = request.headers.get("content-length", "").strip()
    if length and not (length.isascii() and length.isdigit()):
        raise FhirError(400, "invalid", "Content-Length is not a number")
    declared = int(length) if length else None
    if declared is not None and declared > limit:
        raise FhirError(413, "too-long", f"body larger than {limit} bytes")
    want = limit if declared is None else declared
    if most is not None:
        want = min(want, most)
    if want:
        await budget.reserve(want, wait)
        request.state.body_reserved = want


async def read_body(request: Request, *, limit: int, budget: BodyBudget, wait: float) -> bytes:
    """The body, within ``limit``; its reservation is released by ``release_body`` (the endpoint's
    ``finally``), since the bytes live on while the request is parsed and stored."""
    await reserve_body(request, limit=limit, budget=budget, wait=wait)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise FhirError(413, "too-long", f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(value: str) -> tuple[str, str | None]:
    """A Content-Type as (type/subtype in lower case, its charset in lower case or None)."""
    kind, *params = value.split(";")
    charset = None
    for param in params:
        name, _, v = param.partition("=")
        if name.strip().lower() == "charset":
            charset = v.strip().strip('"').strip().lower()
    return kind.strip().lower(), charset


def check_content_type(request: Request, allowed: tuple[str, ...], body: bytes | None = None) -> None:
    """415 unless the body is one of ``allowed`` in UTF-8 (FHIR R4 http.html#mime-type: FHIR is
    UTF-8 throughout; a body declared in another charset would be read as UTF-8 all the same, and
    Latin-1 names stored as mojibake). A body without any Content-Type is 415 too: the server
    does not guess (current HAPI FHIR refuses it as well, with 400). ``body`` None: not read yet,
    so only its declared length says whether there is one (an empty body needs no type)."""
    kind, charset = media_type(request.headers.get("content-type", ""))
    if kind and kind not in allowed:
        raise FhirError(415, "not-supported", f"send {allowed[0]}")
    if charset is not None and charset != "utf-8":
        raise FhirError(415, "not-supported", f"send {allowed[0]} in UTF-8 (charset=utf-8): FHIR bodies are UTF-8")
    if not kind:
        declared = request.headers.get("content-length", "").strip()
        has_body = bool(body) if body is not None else declared not in ("", "0")
        if has_body:
            raise FhirError(415, "not-supported", f"a request body needs Content-Type: {allowed[0]}")


async def release_body(request: Request, budget: BodyBudget) -> None:
    reserved = getattr(request.state, "body_reserved", 0)
    if reserved:
        request.state.body_reserved = 0
        await budget.release(reserved)


class HeavyGate:
    """Requests with a body over HEAVY_BYTES: one at a time, from parsing until the response."""

    def __init__(self) -> None:
        self._one = asyncio.Semaphore(1)

    async def enter(self, request: Request, size: int, wait: float) -> None:
        if size <= HEAVY_BYTES or getattr(request.state, "heavy", False):
            return
        try:
            await asyncio.wait_for(self._one.acquire(), wait)
        except TimeoutError:
            raise FhirError(503, "transient", "the server is busy with other large requests; retry later",
                            headers={"Retry-After": RETRY_AFTER}) from None
        request.state.heavy = True

    def leave(self, request: Request) -> None:
        if getattr(request.state, "heavy", False):
            request.state.heavy = False
            self._one.release()
