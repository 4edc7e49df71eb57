"""Intake validation off the event loop: a few worker processes with a time budget each.

Why processes and not ``asyncio.to_thread``: hl7apy is pure Python, so a validating
thread holds the GIL (and its garbage collector pauses every thread while it walks a
graph of hundreds of megabytes) and a thread cannot be stopped when it overruns. One
ADT with 50 000 repetitions delayed ACKs on other channels by 8 s that way. A worker
process (``python -m transforms.hl7_validate``) has its own interpreter, runs at lower
CPU priority, has its memory capped, and is killed when a message overruns its budget;
the next message gets a fresh worker. ``workers`` bounds how many run at once per
listener, so validation can use at most that many cores whatever the peers send.

The request and answer are small length-prefixed frames on the worker's stdin/stdout
(transforms/hl7_validate.py has both ends' format); a worker answers one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

import structlog

from engine.hl7.message import APPLICATION_INTERNAL_ERROR, Header, HL7Error
from transforms.hl7_validate import encode_request

log = structlog.get_logger()

WORKER_MODULE = "transforms.hl7_validate"
_MAX_ANSWER = 64 * 1024  # an answer is a short JSON object; anything longer is a broken worker


class _Worker:
    """One validation process and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.served = 0

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def ask(self, request: bytes) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(request)
        await self.proc.stdin.drain()
        size = int.from_bytes(await self.proc.stdout.readexactly(4), "big")
        if size > _MAX_ANSWER:
            raise ConnectionError("validation worker sent an oversized answer")
        answer = json.loads(await self.proc.stdout.readexactly(size))
        if not isinstance(answer, dict):
            raise ConnectionError("validation worker sent a malformed answer")
        self.served += 1
        return answer

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def close(self) -> None:
        """End the worker: EOF on stdin (it exits by itself), then kill if it lingers."""
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 2)
        except TimeoutError:
            self.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 2)


class ValidatorPool:
    """``await pool.validate(header, payload)``: None when valid, else raises ``HL7Error``.

    A message that is not answered within ``timeout`` seconds (from the moment a worker
    takes it) is refused with AR/CE 207 naming the budget, and its worker is killed.
    Waiting for a free worker is bounded too: at most ``timeout`` per message ahead.
    """

    def __init__(self, level: str, *, workers: int, timeout: float, memory_mb: int, channel: str,
                 recycle_after: int = 10_000) -> None:
        self.level = level
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.channel = channel
        self.recycle_after = recycle_after
        self.workers = workers
        self._slots = asyncio.Semaphore(workers)
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._closed = False

    async def _spawn(self) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", WORKER_MODULE, str(self.memory_mb),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        w = _Worker(proc)
        self._all.add(w)
        return w

    async def start(self) -> None:
        """Start the workers ahead of the first message (one takes ~0.1-0.5 s to start)."""
        for _ in range(self.workers):
            self._idle.append(await self._spawn())

    async def validate(self, header: Header, payload: bytes) -> None:
        if self._closed:
            raise HL7Error(APPLICATION_INTERNAL_ERROR, "receiver is shutting down, resend later", header=header)
        request = encode_request(self.level, payload)
        async with self._slots:
            w = self._idle.pop() if self._idle else await self._spawn()
            if not w.alive:  # died while idle (killed from outside): not this message's fault
                self._retire(w)
                w = await self._spawn()
            keep = False
            try:
                answer = await asyncio.wait_for(w.ask(request), self.timeout)
                keep = w.alive and w.served < self.recycle_after
            except TimeoutError:
                log.warning("mllp.validation_timeout", channel=self.channel, budget_s=self.timeout,
                            bytes=len(payload), msh_10=header.control_id)
                raise HL7Error(APPLICATION_INTERNAL_ERROR, f"validation did not finish within this "
                               f"receiver's budget of {self.timeout:g} s", header=header) from None
            except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError):
                log.warning("mllp.validation_worker_failed", channel=self.channel,
                            returncode=w.proc.returncode, msh_10=header.control_id)
                raise HL7Error(APPLICATION_INTERNAL_ERROR, "message could not be validated",
                               header=header) from None
            finally:
                if keep and not self._closed and len(self._all) <= self.workers:
                    self._idle.append(w)
                else:
                    self._retire(w)
        if answer:
            code = answer.get("code")
            raise HL7Error(code if isinstance(code, int) else APPLICATION_INTERNAL_ERROR,
                           str(answer.get("text", "")), location=answer.get("location") or None,  # type: ignore[arg-type]
                           header=header)

    def _retire(self, w: _Worker) -> None:
        """Kill now (it may be mid-parse of a hostile message), reap in the background and
        start its successor, so the next message does not wait for a worker to start."""
        w.kill()
        self._all.discard(w)
        loop = asyncio.get_running_loop()
        for coro in (w.close(), self._top_up()):
            task = loop.create_task(coro)
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _top_up(self) -> None:
        if self._closed or len(self._all) >= self.workers:
            return
        w = await self._spawn()
        if self._closed:
            await w.close()
        else:
            self._idle.append(w)

    async def close(self) -> None:
        self._closed = True
        workers = list(self._all)
        self._all.clear()
        self._idle.clear()
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
