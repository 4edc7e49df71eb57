"""The PROXY protocol (HAProxy's spec, v1 text and v2 binary): a TCP load balancer's header.

Behind HAProxy or nginx in TCP mode every connection comes from the balancer; with
``send-proxy`` / ``send-proxy-v2`` it first writes one header naming the real client. This
module reads that header, and only that: it never reads a byte past it, so what follows
(MLLP, a DICOM PDU, a TLS ClientHello, HTTP) is left for the listener.

Trust is by the connecting address (``ProxyProtocolConfig.trusted``): a connection from a
listed balancer MUST start with a header (missing or malformed: the connection is closed,
nothing else read); any other connection is served as without this option, and a header it
sends is never believed (it is just bytes of the listener's protocol, which refuses them).
Serving untrusted peers directly rather than refusing them keeps the option additive (a
modality on the same network keeps working while the balancer is rolled out); whoever
wants only the balancer closes the port to others at the firewall.

Reading is bounded: a v1 line is at most 107 bytes (spec 2.1), a v2 header at most
``MAX_V2_BYTES`` (its TLVs: unique id, TLS facts; HAProxy sends well under 1 KiB), all
within the listener's handshake timeout. Reads wait for bytes (no polling): a peer that
sends one byte at a time costs a wake-up per byte, no busy loop.

Three readers share one parser (``Parser``, sans I/O): asyncio streams (MLLP), blocking
sockets (the DICOM listener's connection threads) and asyncio protocols (engine/http).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass

from pydantic import BaseModel, Field, field_validator

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # "PROXY TCP6 " + 2 x 39 + 2 ports + spaces + CRLF (spec 2.1)
MAX_V2_BYTES = 16 + 2048

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyProtocolConfig(BaseModel):
    """Accept the PROXY protocol header (v1 or v2) from the listed load balancers."""

    trusted: list[str] = Field(
        min_length=1, description="addresses or CIDR networks of the load balancers (e.g. 10.0.0.5, "
        "10.0.1.0/24); a connection from one of them must start with a PROXY protocol header (v1 or "
        "v2), whose source address is then the peer in logs and audit; without one it is closed. "
        "Connections from elsewhere are served as without this option (a header from them is not read)")
    timeout: float = Field(10.0, gt=0, description="most seconds a trusted connection may take to send "
                           "its header (the listener's handshake timeout applies too, the shorter wins)")

    model_config = {"extra": "forbid"}

    @field_validator("trusted")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            ipaddress.ip_network(net, strict=False)  # ValueError: pydantic reports it
        return v

    def networks(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(n, strict=False) for n in self.trusted]


class ProxyError(Exception):
    """The header is missing, malformed or too long: the connection is to be closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer announced. ``source`` is None for LOCAL / UNKNOWN (a health check
    from the balancer itself): the connection's own address stays the peer."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes the header took


class Trust:
    """Which connecting addresses must send a header."""

    def __init__(self, config: ProxyProtocolConfig) -> None:
        self.config = config
        self._nets = config.networks()

    def trusted(self, address: object) -> bool:
        try:
            ip = ipaddress.ip_address(str(address[0]))  # type: ignore[index]
        except (TypeError, IndexError, ValueError):
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self._nets)


class Parser:
    """Sans-I/O: ``need()`` says how many more bytes to read (never more than the header
    still lacks), ``feed(data)`` takes them; ``header`` is set once complete. Raises
    ``ProxyError`` as soon as the bytes cannot be a header."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.header: ProxyHeader | None = None
        self._total = 0  # v2: the whole header's length once known

    def need(self) -> int:
        b = self.buf
        if len(b) < 6:
            return 6 - len(b)  # "PROXY " or the first 6 bytes of the v2 signature
        if b.startswith(b"PROXY "):
            return 1  # v1: byte by byte up to CRLF, so nothing past the line is read
        if len(b) < 16:
            return 16 - len(b)
        return self._total - len(b)

    def feed(self, data: bytes) -> None:
        self.buf += data
        b = self.buf
        if len(b) <= 6:
            if not (b"PROXY "[:len(b)] == bytes(b) or V2_SIGNATURE[:len(b)] == bytes(b)):
                raise ProxyError("no PROXY protocol header")
            return
        if b.startswith(b"PROXY "):
            if b.endswith(b"\r\n"):
                self.header = _v1(bytes(b))
            elif len(b) >= V1_MAX:
                raise ProxyError("v1 header longer than 107 bytes")
            elif _unknown(b):
                pass  # spec 2.1: anything up to the CRLF is ignored (a lone CR or LF, any byte)
            elif b"\r" in b[:-1] or b"\n" in b:
                raise ProxyError("malformed v1 header")
            return
        if not bytes(b[:12]) == V2_SIGNATURE[:min(12, len(b))]:
            raise ProxyError("no PROXY protocol header")
        if len(b) < 16:
            return
        if not self._total:
            ver_cmd, _fam, length = struct.unpack("!BBH", b[12:16])
            if ver_cmd >> 4 != 2 or ver_cmd & 0x0F > 1:
                raise ProxyError("unsupported v2 version or command")
            self._total = 16 + length
            if self._total > MAX_V2_BYTES:
                raise ProxyError(f"v2 header of {self._total} bytes (limit {MAX_V2_BYTES})")
        if len(b) >= self._total:
            self.header = _v2(bytes(b[:self._total]))


def _unknown(line: bytes | bytearray) -> bool:
    """``PROXY UNKNOWN`` then a space or the CRLF: the balancer does not know the client (spec
    2.1: the receiver ignores the rest of the line, whatever its bytes, and uses the connection's
    own addresses). Shorter than the word: not decided yet, judged by the other rules."""
    return line.startswith(b"PROXY UNKNOWN") and (len(line) == 13 or line[13:14] in (b" ", b"\r"))


def _v1(line: bytes) -> ProxyHeader:
    if _unknown(line):
        return ProxyHeader(1, None, None, len(line))
    try:
        parts = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("malformed v1 header") from None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyError("malformed v1 header")
    try:
        src, dst = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
        sport, dport = _port(parts[4]), _port(parts[5])
    except ValueError:
        raise ProxyError("malformed v1 header") from None
    if src.version != dst.version or src.version != (4 if parts[1] == "TCP4" else 6):
        raise ProxyError("malformed v1 header: family and addresses differ")
    return ProxyHeader(1, (str(src), sport), (str(dst), dport), len(line))


def _port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ValueError(text)
    return int(text)


def _v2(data: bytes) -> ProxyHeader:
    ver_cmd, fam, _ = struct.unpack("!BBH", data[12:16])
    body = data[16:]
    if ver_cmd & 0x0F == 0:  # LOCAL: the balancer's own connection (health check)
        return ProxyHeader(2, None, None, len(data))
    family, transport = fam >> 4, fam & 0x0F
    if family == 1 and len(body) >= 12:
        s, d, sp, dp = struct.unpack("!4s4sHH", body[:12])
        return ProxyHeader(2, (str(ipaddress.IPv4Address(s)), sp), (str(ipaddress.IPv4Address(d)), dp), len(data))
    if family == 2 and len(body) >= 36:
        s, d, sp, dp = struct.unpack("!16s16sHH", body[:36])
        return ProxyHeader(2, (str(ipaddress.IPv6Address(s)), sp), (str(ipaddress.IPv6Address(d)), dp), len(data))
    if family == 0 or family == 3 or transport == 0:  # UNSPEC / unix: no usable address
        return ProxyHeader(2, None, None, len(data))
    raise ProxyError("v2 address block shorter than its family needs")


async def read_stream(reader: asyncio.StreamReader, timeout: float) -> ProxyHeader:
    """The header from an asyncio stream, exactly its bytes, within ``timeout`` seconds."""
    parser = Parser()
    try:
        async with asyncio.timeout(timeout):
            while parser.header is None:
                data = await reader.read(parser.need())
                if not data:
                    raise ProxyError("closed before the PROXY header ended")
                parser.feed(data)
    except TimeoutError:
        raise ProxyError("PROXY header not received in time") from None
    return parser.header


def read_socket(sock: socket.socket, timeout: float) -> ProxyHeader:
    """The header from a blocking socket (also an ``ssl.SSLSocket`` before its handshake:
    the raw bytes are read from the file descriptor, the TLS handshake follows on what is left)."""
    parser = Parser()
    deadline = time.monotonic() + timeout
    old = sock.gettimeout()
    try:
        while parser.header is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProxyError("PROXY header not received in time")
            sock.settimeout(left)
            try:
                data = socket.socket.recv(sock, parser.need())
            except TimeoutError:
                raise ProxyError("PROXY header not received in time") from None
            except OSError as e:
                raise ProxyError(f"connection failed: {type(e).__name__}") from None
            if not data:
                raise ProxyError("closed before the PROXY header ended")
            parser.feed(data)
    finally:
        try:
            sock.settimeout(old)
        except OSError:
            pass
    return parser.header


async def read_transport(transport: asyncio.BaseTransport, timeout: float) -> ProxyHeader:
    """The header from an accepted asyncio transport whose reading is paused (so what follows
    the header, e.g. a TLS ClientHello, stays in the socket for the next reader).

    Read through a duplicate of the socket's descriptor: asyncio refuses ``sock_recv`` on a
    descriptor a transport owns, and the duplicate shares the connection, not the transport."""
    raw = transport.get_extra_info("socket")
    if raw is None:
        raise ProxyError("no socket to read the PROXY header from")
    loop = asyncio.get_running_loop()
    dup = socket.socket(fileno=os.dup(raw.fileno()))
    dup.setblocking(False)
    parser = Parser()
    try:
        async with asyncio.timeout(timeout):
            while parser.header is None:
                data = await loop.sock_recv(dup, parser.need())
                if not data:
                    raise ProxyError("closed before the PROXY header ended")
                parser.feed(data)
    except TimeoutError:
        raise ProxyError("PROXY header not received in time") from None
    except OSError as e:
        raise ProxyError(f"connection failed: {type(e).__name__}") from None
    finally:
        dup.close()  # the duplicate descriptor only; the transport keeps its own
    return parser.header


def peer_of(header: ProxyHeader, own: tuple[str, int]) -> tuple[str, int]:
    """The address to log and audit: the announced source, or the connection's own for
    LOCAL / UNKNOWN headers."""
    return header.source if header.source is not None else own
