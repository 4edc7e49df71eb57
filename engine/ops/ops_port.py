"""The operations port's HTTP server (/metrics, /healthz, /readyz): bounded, one thread, a small pool.

It was a ``ThreadingHTTPServer``: a thread per connection, unbounded, each held up to its 10 s
socket timeout, so 300 idle connections were 300 threads (and as many again every 10 s). This
port is for load balancers, container runtimes and Prometheus, which send their request as soon
as they connect; so here:

- one selector thread accepts and reads request heads, for all connections at once (an idle
  connection costs a socket and at most ``MAX_HEAD`` bytes, no thread);
- at most ``max_connections`` are open; a new connection over that closes the oldest one still
  waiting for its head (an idle connection must not lock a health check out, and a check's
  head arrives with its connection); a head not complete within ``header_timeout`` is closed;
- ``/healthz`` is answered by the selector thread itself (liveness must not wait behind a slow
  store), ``/metrics`` and ``/readyz`` (which read the store) by one of ``workers`` threads, at
  most ``queued`` more waiting; past that, 503 at once;
- every answer is ``Connection: close`` (as before, HTTP/1.0 style); GET and HEAD only.

Stays off the engine's event loop on purpose: ``/healthz`` answers while the process is alive
even when that loop is stuck (engine/ops/health.py).
"""

from __future__ import annotations

import contextlib
import http
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger()
MAX_HEAD = 8 * 1024
SEND_TIMEOUT = 5.0
Answer = tuple[int, str, bytes]  # status, Content-Type, body


def response(status: int, content_type: str, body: bytes, *, head_only: bool = False) -> bytes:
    """A complete ``Connection: close`` response."""
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Cache-Control: no-store", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


class OpsPort:
    """Serve ``answer(path)`` on ``host:port`` until ``close``; ``inline(path)`` says which paths
    are cheap enough for the selector thread (the rest go to the pool). Binds in ``__init__`` (a
    taken port fails the caller at once)."""

    def __init__(self, host: str, port: int, answer: Callable[[str], Answer], *, inline: Callable[[str], bool],
                 max_connections: int = 64, header_timeout: float = 3.0, workers: int = 4,
                 queued: int = 16) -> None:
        self.answer = answer
        self.inline = inline
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.listener = socket.create_server((host, port), backlog=128)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        # daemon threads (a ThreadPoolExecutor's are joined at exit: a /readyz waiting on a
        # store that does not answer would hold the process's exit for its connect timeout)
        self.jobs: queue.SimpleQueue[tuple[socket.socket, str, bool] | None] = queue.SimpleQueue()
        self.workers = [threading.Thread(target=self._work, name=f"metrics-http-{i}", daemon=True)
                        for i in range(workers)]
        self.most_busy = workers + queued
        self.busy = 0  # requests in the pool, running or queued
        self._lock = threading.Lock()
        self.selector = selectors.DefaultSelector()
        self.waiting: dict[socket.socket, tuple[float, bytearray]] = {}  # accept order: oldest first
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._evicted = 0
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)

    def start(self) -> int:
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread.start()
        for worker in self.workers:
            worker.start()
        return self.port

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for _ in self.workers:
            self.jobs.put(None)

    # -- the selector thread ------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                oldest = next(iter(self.waiting.values()), None)
                wait = max(0.0, oldest[0] - time.monotonic()) if oldest else None
                for key, _ in self.selector.select(wait):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj is not self._wake_r:
                        self._read(key.fileobj)  # type: ignore[arg-type]
                self._expire()
        except Exception as e:  # never silently: the port would be gone with /healthz
            log.error("metrics.server_failed", error=type(e).__name__)
        finally:
            for sock in list(self.waiting):
                self._drop(sock)
            self.selector.close()
            self.listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: try again on the next wake-up
                log.warning("metrics.accept_failed", error=type(e).__name__)
                return
            if len(self.waiting) >= self.max_connections:
                self._drop(next(iter(self.waiting)))
                self._evicted += 1
                if self._evicted in (1, 10, 100) or self._evicted % 1000 == 0:
                    log.warning("metrics.connection_evicted", reason="max_connections",
                                limit=self.max_connections, evicted_total=self._evicted)
            sock.setblocking(False)
            self.waiting[sock] = (time.monotonic() + self.header_timeout, bytearray())
            self.selector.register(sock, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        if sock not in self.waiting:
            return  # evicted by an accept in the same round
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        buf = self.waiting[sock][1]
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            end = buf.find(b"\n\n")  # a bare-LF client (printf | nc)
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._reply_now(sock, response(431, "application/json", b'{"error": "request head too large"}'))
            return
        self._forget(sock)
        parts = bytes(buf[:buf.find(b"\n")]).split()
        method, path = (parts[0], parts[1].decode("latin-1").split("?", 1)[0]) if len(parts) >= 2 else (b"", "")
        if method not in (b"GET", b"HEAD"):
            self._reply_now(sock, response(405 if path else 400, "application/json", b'{"error": "GET only"}'))
        elif self.inline(path):
            self._reply_now(sock, response(*self.answer(path), head_only=method == b"HEAD"))
        elif not self._take():
            self._reply_now(sock, response(503, "application/json", b'{"error": "busy"}'))
        else:
            self.jobs.put((sock, path, method == b"HEAD"))

    def _expire(self) -> None:
        now = time.monotonic()
        for sock, (deadline, _) in list(self.waiting.items()):
            if deadline > now:
                break  # accept order is deadline order
            self._drop(sock)

    def _forget(self, sock: socket.socket) -> None:
        self.waiting.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def _drop(self, sock: socket.socket) -> None:
        self._forget(sock)
        sock.close()

    def _reply_now(self, sock: socket.socket, data: bytes) -> None:
        """A small answer from the selector thread: it fits an empty socket buffer, never blocks."""
        self._forget(sock)
        with contextlib.suppress(OSError):
            sock.send(data)
        sock.close()

    # -- a pool thread ------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            self._serve(*job)

    def _serve(self, sock: socket.socket, path: str, head_only: bool) -> None:
        try:
            try:
                answer = self.answer(path)
            except Exception as e:  # a readiness check that raised: an answer all the same
                log.warning("metrics.request_failed", error=type(e).__name__)
                answer = 500, "application/json", b'{"error": "internal error"}'
            sock.settimeout(SEND_TIMEOUT)
            sock.sendall(response(*answer, head_only=head_only))
        except (ConnectionError, TimeoutError):
            pass  # a checker that resets once it has the status line (HAProxy's httpchk)
        except Exception as e:  # one structured line, never a traceback on stderr
            log.warning("metrics.request_failed", error=type(e).__name__)
        finally:
            sock.close()
            with self._lock:
                self.busy -= 1

    def _take(self) -> bool:
        with self._lock:
            if self.busy >= self.most_busy:
                return False
            self.busy += 1
            return True
