"""Open connections per client address: ``max_connections_per_client`` of every listener.

A listener's ``max_connections`` bounds what all peers together may hold open; without a
second bound one client (a misbehaving modality, a scanner, a sender opening connections in a
loop) can take every place and every other peer is refused until its connections time out.
Each listener counts its connections here by client address: the one a trusted balancer's
PROXY header announces, else the connecting peer's (behind a balancer without the PROXY
protocol every client is the balancer, so the docs say to raise the limit or turn it off).
One lock: the DICOM listener takes places from its connection threads, the asyncio listeners
from their loop.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any


def client_host(address: Any) -> str:
    """The host a connection is counted on, in one spelling per client: an IPv4-mapped IPv6
    address (``::ffff:10.0.0.1``, or ``::ffff:a00:1`` as a PROXY v2 header's bytes read) as its
    IPv4 form, IPv6 compressed; '?' when the socket has none."""
    host = str(address[0]) if isinstance(address, tuple) and address else "?"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class ClientSlots:
    """Places per client address; ``limit`` None takes every connection. A connection takes its
    place when admitted and gives it back exactly once, when it ends."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.count: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> bool:
        with self._lock:
            n = self.count.get(client, 0)
            if self.limit is not None and n >= self.limit:
                return False
            self.count[client] = n + 1
            return True

    def give_back(self, client: str) -> None:
        with self._lock:
            n = self.count.get(client, 0) - 1
            if n > 0:
                self.count[client] = n
            else:
                self.count.pop(client, None)
