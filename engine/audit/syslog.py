"""Ship the audit trail to an audit record repository: RFC 5424 syslog over TLS (RFC 5425).

Events are rows first (engine/audit/trail.py); this exporter reads rows with exported=0 in
id order, renders each as a DICOM PS3.15 A.5 message, frames it with RFC 5425 octet
counting (``MSG-LEN SP SYSLOG-MSG``; the same framing as RFC 6587 over plain TCP) and
marks the rows exported only after the batch was written and flushed to the socket.
While the receiver is down it retries with exponential backoff and the events simply
wait in the store: nothing is dropped, nothing is held only in memory.

Syslog over TCP has no application-level acknowledgment, so delivery is at least
once: a connection that breaks after a write but before the rows are marked makes
that batch go again; every message carries its row id as structured data
(``[medrelay@32473 id="N"]``) so a repository can drop repeats. A connection the
repository closed is noticed before writing; one that dies silently can still swallow
the batch in flight, which no TCP syslog transport can prevent (RFC 5425 has no acks).

With several engines on one store, one exports at a time: the runtime passes ``held``, the
process's hold of the ``audit-export`` lease (engine/ops/singleton.py). The others wait; when
the exporting engine dies its lease runs out and another takes over within seconds, resending
at most the batch that was in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update

from engine.audit.ps3_15 import render
from engine.security.tls import TLSConfig, client_context
from engine.store import schema

log = structlog.get_logger()

BOM = b"\xef\xbb\xbf"
FACILITY_AUTHPRIV = 10  # "security/authorization messages", as IHE ATNA requires
SEV_NOTICE, SEV_WARNING = 5, 4
SD_ID = "medrelay@32473"  # 32473 is the private enterprise number RFC 5612 reserves for examples


class SyslogConfig(BaseModel):
    """`audit.syslog:` where the audit trail goes (an IHE ATNA audit record repository)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(..., description="audit record repository host")
    port: int = Field(6514, ge=1, le=65535, description="6514 is the IANA port for syslog over TLS")
    transport: str = Field("tls", pattern="^(tls|tcp)$",
                           description="tls = RFC 5425 (default); tcp = RFC 6587 octet counting, unencrypted, "
                           "only for a receiver on the same host")
    tls: TLSConfig | None = Field(None, description="CA to verify the repository (system CAs when unset), "
                                  "cert/key for mutual TLS")
    app_name: str = Field("medrelay", pattern=r"^[!-~]{1,48}$", description="RFC 5424 APP-NAME")
    batch: int = Field(100, ge=1, le=10000, description="events written per flush")
    retry_initial: float = Field(0.5, gt=0, description="seconds before the first reconnect")
    retry_max: float = Field(60.0, gt=0, description="upper bound of the reconnect backoff")
    poll_interval: float = Field(0.5, gt=0, description="seconds between looks for new events when idle")


def frame(message: bytes) -> bytes:
    """RFC 5425 / RFC 6587 octet counting: the length in ASCII decimal, a space, the message."""
    return str(len(message)).encode("ascii") + b" " + message


def syslog_message(row: dict[str, Any], xml: bytes, *, host: str, app_name: str) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] BOM MSG`` (RFC 5424)."""
    sev = SEV_NOTICE if (row.get("outcome") or "success") == "success" else SEV_WARNING
    pri = FACILITY_AUTHPRIV * 8 + sev
    ts = datetime.fromtimestamp(float(row["at"]), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    hostname = "".join(c for c in host if "!" <= c <= "~")[:255] or "-"
    sd = f'[{SD_ID} id="{int(row["id"])}"]'
    head = f"<{pri}>1 {ts} {hostname} {app_name} {os.getpid()} IHE+RFC-3881 {sd} "
    return head.encode("ascii") + BOM + xml


class SyslogExporter:
    """One background task per engine: store -> syslog, in order, at least once."""

    def __init__(self, store: Any, config: SyslogConfig, *, source_id: str | None = None,
                 site_id: str | None = None, held: Callable[[], bool] | None = None) -> None:
        self.store = store
        self.held = held or (lambda: True)  # this process's turn to export (a lease, several engines)
        self.config = config
        self.host = socket.gethostname()
        self.source_id = source_id or self.host
        self.site_id = site_id
        self._ssl: ssl.SSLContext | None = None
        if config.transport == "tls":
            self._ssl = client_context(config.tls or TLSConfig())
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self.sent = 0

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-syslog")

    def wake(self) -> None:
        """Look for new rows now instead of at the next poll (cheap; safe from the loop)."""
        self._wake.set()

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Send what is pending for up to ``flush_timeout`` seconds, then stop; the rest waits in the store."""
        if self._task is None:
            return
        if self._writer is not None:  # connected: worth waiting for the last events (engine.stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained(), flush_timeout)
        self._stopping = True
        self._wake.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        await self._close()

    async def _drained(self) -> None:
        while await asyncio.to_thread(self._pending_count) > 0:
            self._wake.set()
            await asyncio.sleep(0.05)

    # -- store side ------------------------------------------------------------------
    def _pending_count(self) -> int:
        a = schema.audit_events
        with self.store.engine.connect() as conn:
            return len(conn.execute(select(a.c.id).where(a.c.exported == 0).limit(1)).all())

    def _fetch(self) -> list[dict[str, Any]]:
        a = schema.audit_events
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(a).where(a.c.exported == 0).order_by(a.c.id)
                                .limit(self.config.batch)).mappings().all()
        return [dict(r) for r in rows]

    def _mark(self, ids: list[int]) -> None:
        a = schema.audit_events
        with self.store.engine.begin() as conn:
            conn.execute(update(a).where(a.c.id.in_(ids)).values(exported=1))

    def _encode(self, row: dict[str, Any]) -> bytes:
        try:
            xml = render(row, source_id=self.source_id, site_id=self.site_id, app=self.config.app_name,
                         host=self.host)
        except Exception as e:  # a rendering bug must not stall the trail: send what we know
            log.error("audit.render_failed", audit_id=row.get("id"), error=type(e).__name__)
            fallback = {**row, "entity": None, "detail": f"render failed: {type(e).__name__}"}
            xml = render(fallback, source_id=self.source_id, site_id=self.site_id, app=self.config.app_name,
                         host=self.host)
        return frame(syslog_message(row, xml, host=self.host, app_name=self.config.app_name))

    # -- network side ----------------------------------------------------------------
    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        cfg = self.config
        server_hostname = None
        if self._ssl is not None:
            server_hostname = (cfg.tls.server_name if cfg.tls and cfg.tls.server_name else cfg.host)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(cfg.host, cfg.port, ssl=self._ssl, server_hostname=server_hostname), 15)
        self._reader = reader
        self._writer = writer
        log.info("audit.syslog_connected", host=cfg.host, port=cfg.port, tls=self._ssl is not None)
        return writer

    async def _close(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 2)

    async def _send(self, rows: list[dict[str, Any]]) -> None:
        writer = await self._connect()
        if self._reader is not None and self._reader.at_eof():  # the repository closed on us: reconnect before writing
            await self._close()
            writer = await self._connect()
        writer.write(b"".join(self._encode(r) for r in rows))
        await asyncio.wait_for(writer.drain(), 30)

    async def _run(self) -> None:
        delay = self.config.retry_initial
        while not self._stopping:
            if not self.held():  # another engine exports; be ready to take over
                await self._close()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
                continue
            try:
                rows = await asyncio.to_thread(self._fetch)
            except Exception as e:
                log.error("audit.read_failed", error=type(e).__name__)
                rows = []
            if not rows:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
                continue
            try:
                await self._send(rows)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
                await self._close()
                log.warning("audit.syslog_unavailable", host=self.config.host, port=self.config.port,
                            error=type(e).__name__, pending_from=rows[0]["id"], retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max)
                continue
            await asyncio.to_thread(self._mark, [r["id"] for r in rows])
            self.sent += len(rows)
            delay = self.config.retry_initial
            log.debug("audit.exported", count=len(rows), last_id=rows[-1]["id"], at=time.time())
