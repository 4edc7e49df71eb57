"""A TCP proxy on 127.0.0.1 that a test can break: cut every connection, refuse new ones, stall.

Put between the engine and a real peer (PostgreSQL, a Storage SCP) to make real network
faults on demand, without mocking the protocol on either side:

- ``cut()``: every proxied connection is reset, and new ones are reset as soon as they are
  accepted (the client sees "connection refused/reset"), until ``restore()``;
- ``stall()``: stop reading from the clients, so their writes fill the socket buffers and
  block, as with a peer that stopped reading; ``resume()`` reads again.

The proxy runs its own asyncio loop in a daemon thread; every call is thread-safe.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, rcvbuf: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.rcvbuf = rcvbuf
        self.accepted = 0
        self._cut = False
        self._flowing: asyncio.Event | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tcp-proxy")
        self._thread.start()
        self._server: asyncio.base_events.Server | None = None
        self.port = self._call(self._start())

    def _call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf:  # inherited by accepted sockets: no receive autotuning, buffers fill quickly
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._handle, sock=sock)
        return sock.getsockname()[1]

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:  # linger 0: close sends RST, like a peer whose host went away
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._cut:
            self._reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._reset(writer)
            return
        self._conns.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool) -> None:
            try:
                while True:
                    if from_client:
                        assert self._flowing is not None
                        await self._flowing.wait()
                    data = await src.read(65536)
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                self._reset(dst) if self._cut else dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))
        finally:
            self._conns.discard(writer)
            self._conns.discard(up_writer)

    async def _do_cut(self) -> None:
        self._cut = True
        for w in list(self._conns):
            self._reset(w)
        self._conns.clear()

    async def _set_cut(self, value: bool) -> None:
        self._cut = value

    async def _set_flowing(self, value: bool) -> None:
        assert self._flowing is not None
        self._flowing.set() if value else self._flowing.clear()

    def cut(self) -> None:
        """Reset every proxied connection and every new one until ``restore``."""
        self._call(self._do_cut())

    def restore(self) -> None:
        self._call(self._set_cut(False))

    def stall(self) -> None:
        """Stop reading what clients send (their writes block once the buffers are full)."""
        self._call(self._set_flowing(False))

    def resume(self) -> None:
        self._call(self._set_flowing(True))

    @property
    def open_connections(self) -> int:
        return len(self._conns) // 2

    def close(self) -> None:
        async def _close() -> None:
            await self._do_cut()
            if self._server is not None:
                self._server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            self._call(_close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
