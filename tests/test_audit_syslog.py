"""The audit exporter against a real TLS syslog receiver (RFC 5425 octet-counted frames).

The receiver is an asyncio/ssl server written here from the RFCs, not from our own
sender code, so framing and header mistakes would show up as parse failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import threading
import time
from xml.etree import ElementTree as ET

import engine_fakes
import pytest
from conftest import free_port
from sqlalchemy import func, select
from tls_certs import make_pki

from engine.envelope import Envelope
from engine.store import schema

# RFC 5424 HEADER: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG
HEADER = re.compile(rb"^<(\d{1,3})>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
                    rb"([!-~]{1,255}) ([!-~]{1,48}) ([!-~]{1,128}) ([!-~]{1,32}) (\[[^\]]*\]|-) ")


class SyslogReceiver:
    """RFC 5425 receiver in its own thread: TLS (optionally mutual), octet counting.

    ``stop`` cancels and awaits the connection handlers and closes the loop, so no handler
    coroutine is left to be closed by the garbage collector after its loop is gone (that
    surfaced as PytestUnraisableExceptionWarning in whichever test ran next).
    """

    def __init__(self, port: int, ssl_ctx: ssl.SSLContext | None) -> None:
        self.port = port
        self.ssl_ctx = ssl_ctx
        self.frames: list[bytes] = []
        self.errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    def start(self) -> SyslogReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", self.port, ssl=self.ssl_ctx,
                                                  reuse_address=True)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                digits = await reader.readuntil(b" ")
                if not digits[:-1].isdigit() or digits[:1] == b"0":
                    self.errors.append(f"bad MSG-LEN {digits[:20]!r}")
                    return
                self.frames.append(await reader.readexactly(int(digits[:-1])))
        except asyncio.IncompleteReadError as e:
            if e.partial:
                self.errors.append(f"truncated frame {e.partial[:40]!r}")
        except (ConnectionError, ssl.SSLError) as e:
            self.errors.append(type(e).__name__)
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    def stop(self) -> None:
        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
            handlers = list(self._handlers)
            for t in handlers:
                t.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def parse_frame(frame: bytes) -> tuple[dict, ET.Element]:
    m = HEADER.match(frame)
    assert m, frame[:200]
    pri, ts, host, app, procid, msgid, sd = m.groups()
    rest = frame[m.end():]
    assert rest.startswith(b"\xef\xbb\xbf"), "MSG must start with the UTF-8 BOM (RFC 5424 6.4)"
    root = ET.fromstring(rest[3:])
    rid = int(re.search(rb'id="(\d+)"', sd).group(1))
    return {"pri": int(pri), "ts": ts, "host": host, "app": app, "msgid": msgid, "id": rid}, root


def server_ctx(pki, *, mutual: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki.server.cert, pki.server.key)
    if mutual:
        ctx.load_verify_locations(pki.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


YAML = """
store: {{url: "{url}", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
audit:
  source_id: gw-test
  site_id: TEST-HOSPITAL
  syslog:
    host: 127.0.0.1
    port: {port}
    app_name: medrelay-test
    retry_initial: 0.1
    retry_max: 0.4
    poll_interval: 0.1
    batch: 7
    tls: {{ca: "{ca}", cert: "{cert}", key: "{key}", server_name: localhost}}
channels:
  in:
    source: {{type: test_null}}
    routes:
      - name: a
        to: {{type: test_collect, name: syslogtest}}
"""


def pending(store) -> int:
    a = schema.audit_events
    with store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(a).where(a.c.exported == 0)).scalar_one()


def all_ids(store) -> list[int]:
    a = schema.audit_events
    with store.engine.connect() as c:
        return list(c.execute(select(a.c.id).order_by(a.c.id)).scalars())


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


def test_receiver_down_then_up_delivers_everything_once_in_order(engine_factory, store_url, pki):
    port = free_port()
    eng = engine_factory(YAML.format(url=store_url, port=port, ca=pki.ca, cert=pki.client.cert,
                                     key=pki.client.key))
    for i in range(20):
        env = Envelope(channel="in", kind="hl7v2", payload=f"m{i}".encode(), headers={"MSH-9.1": "ADT"})
        assert eng.call(eng.runtime.intake.submit(env)).status == "accepted"
    eng.wait_for(lambda: len(engine_fakes.OUTBOX.get("syslogtest", [])) >= 20)
    # engine.start + 20 receive + 20 send, all still waiting in the store (the send events are
    # written when the outcomes settle, which may be after the destination has the messages)
    eng.wait_for(lambda: pending(eng.store) >= 41, timeout=30)
    time.sleep(1.0)  # several failed connection attempts with backoff
    assert eng.runtime.audit_exporter.sent == 0

    rx = SyslogReceiver(port, server_ctx(pki, mutual=True)).start()
    try:
        eng.wait_for(lambda: pending(eng.store) == 0, timeout=30)
        ids = all_ids(eng.store)
        eng.wait_for(lambda: len(rx.frames) >= len(ids), timeout=10)
        time.sleep(0.3)
        assert not rx.errors, rx.errors
        parsed = [parse_frame(f) for f in rx.frames]
        assert [h["id"] for h, _ in parsed] == ids  # exactly in order, each once
        actions = []
        for h, root in parsed:
            assert h["pri"] in (85, 84)  # facility 10 (security/authorization), notice or warning
            assert h["app"] == b"medrelay-test" and h["msgid"] == b"IHE+RFC-3881"
            assert root.tag == "AuditMessage"
            assert root.find("EventIdentification/EventID").get("codeSystemName") == "DCM"
            assert root.find("AuditSourceIdentification").get("AuditSourceID") == "gw-test"
            assert root.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "TEST-HOSPITAL"
            assert root.findall("ActiveParticipant")
            actions.append(root.find("EventIdentification/EventTypeCode[@codeSystemName='medrelay']")
                           .get("csd-code"))
        assert actions[0] == "engine.start"
        assert actions.count("message.receive") == 20 and actions.count("message.send") == 20
        # new events flow while the receiver is up
        env = Envelope(channel="in", kind="hl7v2", payload=b"late", headers={})
        eng.call(eng.runtime.intake.submit(env))
        eng.wait_for(lambda: any(b"message.receive" in f and env.id.encode() in f for f in rx.frames[len(ids):]))
    finally:
        eng.stop()
        rx.stop()


def test_untrusted_repository_is_refused_and_events_wait(engine_factory, store_url, pki, tmp_path):
    """A receiver whose certificate our CA did not sign gets nothing; the events stay queued."""
    port = free_port()
    rogue = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    rogue.load_cert_chain(pki.rogue_client.cert, pki.rogue_client.key)  # other CA, wrong name
    rx = SyslogReceiver(port, rogue).start()
    try:
        eng = engine_factory(YAML.format(url=store_url, port=port, ca=pki.ca, cert=pki.client.cert,
                                         key=pki.client.key))
        time.sleep(1.0)
        assert rx.frames == [] and pending(eng.store) >= 1
        assert eng.runtime.audit_exporter.sent == 0
    finally:
        rx.stop()


def test_plain_tcp_transport_rfc6587(engine_factory, store_url):
    port = free_port()
    rx = SyslogReceiver(port, None).start()
    yaml = (YAML.replace('    tls: {{ca: "{ca}", cert: "{cert}", key: "{key}", server_name: localhost}}\n',
                         "    transport: tcp\n"))
    try:
        eng = engine_factory(yaml.format(url=store_url, port=port))
        eng.wait_for(lambda: pending(eng.store) == 0)
        eng.wait_for(lambda: rx.frames)
        head, root = parse_frame(rx.frames[0])
        assert root.find("EventIdentification/EventID").get("csd-code") == "110100"
        eng.stop()  # engine.stop is flushed before the store closes

        def last_is_stop() -> bool:  # written before stop returns, read by the receiver's own thread
            return bool(rx.frames) and parse_frame(rx.frames[-1])[1].find(
                "EventIdentification/EventTypeCode").get("csd-code") == "110121"
        eng.wait_for(last_is_stop, timeout=30)
    finally:
        rx.stop()
