"""Blocking destination calls (pynetdicom, file writes) on a thread of the destination's own.

asyncio cannot cancel a thread: when the deadline of a send expires (the route worker's,
engine/pipeline.py, or the destination's own) the coroutine gives up, but the thread
runs on until the call it is in returns. Three rules keep that safe:

- every call runs on a daemon thread of its own, never on the shared default executor
  that the queue, intake and the store use: a call stuck in the kernel (a write to a
  hung NFS mount, a peer that never reads) ties up that thread only, and cannot keep
  the process from exiting;
- while a destination's previous call is still running, a new one waits for it within
  its own deadline and fails with a ``DeliveryError`` (retried with the route's backoff)
  if it is still running then, so retries neither pile up threads nor run two sends of
  one delivery at the same time;
- when the wait is abandoned, ``interrupt`` runs on the event loop: the destination
  passes something that unblocks the thread (shutting its socket down), so the thread
  ends promptly and the connection is never left half-used.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from engine.components import DeliveryError

log = structlog.get_logger()

T = TypeVar("T")


class BlockingCalls:
    """One blocking call at a time for one destination, bounded by a deadline."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._idle = threading.Event()
        self._idle.set()
        self._last: asyncio.Future[Any] | None = None

    @property
    def busy(self) -> bool:
        """A previous call has not returned yet (its thread is still running)."""
        return not self._idle.is_set()

    async def run(self, fn: Callable[[], T], *, timeout: float | None, what: str = "send",
                  interrupt: Callable[[], None] | None = None) -> T:
        """Run ``fn`` on a thread; give up after ``timeout`` seconds (``DeliveryError``)."""
        loop = asyncio.get_running_loop()
        started, limit = loop.time(), timeout
        if self.busy:
            await self._wait_idle(loop, timeout)
        if self.busy:
            raise DeliveryError(f"the previous {what} of this destination has not returned yet")
        if timeout is not None:
            timeout = max(timeout - (loop.time() - started), 0.001)
        result: asyncio.Future[T] = loop.create_future()
        self._last = result
        self._idle.clear()

        def settle(value: T | None, error: BaseException | None) -> None:
            if result.done():
                return
            if error is not None:
                result.set_exception(error)
            else:
                result.set_result(value)  # type: ignore[arg-type]

        def target() -> None:
            value: T | None = None
            error: BaseException | None = None
            try:
                value = fn()
            except BaseException as e:  # handed to the awaiting coroutine, as asyncio.to_thread does
                error = e
            finally:
                self._idle.set()
            try:
                loop.call_soon_threadsafe(settle, value, error)
            except RuntimeError:  # the loop is closed: nobody waits for this call any more
                pass

        threading.Thread(target=target, name=f"{self.name}-{what}", daemon=True).start()
        # Retrieve a late exception so asyncio does not log "never retrieved" for an abandoned call.
        result.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            done, _ = await asyncio.wait({result}, timeout=timeout)
        except asyncio.CancelledError:  # the route worker's deadline, or shutdown
            self._interrupt(interrupt, what)
            raise
        if not done:
            self._interrupt(interrupt, what)
            raise DeliveryError(f"{what} did not finish within {limit:g}s")
        return result.result()

    async def _wait_idle(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        last = self._last
        if last is not None and last.get_loop() is loop:
            await asyncio.wait({last}, timeout=timeout)
            return
        end = None if timeout is None else loop.time() + timeout
        while self.busy and (end is None or loop.time() < end):  # started from another loop
            await asyncio.sleep(0.05)

    def _interrupt(self, interrupt: Callable[[], None] | None, what: str) -> None:
        log.warning("destination.call_abandoned", destination=self.name, call=what)
        if interrupt is None:
            return
        try:
            interrupt()
        except Exception as e:  # best effort: the thread's own timeouts still bound it
            log.warning("destination.interrupt_failed", destination=self.name, error=type(e).__name__)
