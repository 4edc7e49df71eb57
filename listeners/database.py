"""`source: {type: database}`: poll a table or a query (PostgreSQL, or any SQLAlchemy URL) for new rows.

Each row becomes one message: an HL7 v2 message (MSH made from the config, the row's
values written at HL7 positions with the mapping engine's path writing, so they are
escaped and land where ``hl7_map`` would put them), a FHIR resource (a JSON template
whose ``{column}`` strings take the row's values), or a JSON envelope (a FHIR
``Parameters`` resource with one parameter per column, so it stays a message kind
medrelay routes: fhir_map can make it into anything).

Never a row twice, never one skipped, across any crash (``mode``):

- ``cursor`` (a monotonically increasing key column): rows are read in key order after
  the last key committed. That key lives in medrelay's own store (``source_cursors``,
  engine/store/sources.py) and moves in the same intake transaction as each row's
  message, by compare-and-set from the previous row's key: if one row fails to commit,
  no later row of that poll can commit either, so the cursor never passes a row that is
  not stored. A kill -9 loses nothing: the next poll starts right after the last commit.
- ``update``: the query selects rows still to do (``WHERE sent = false``); after the
  commit the ``update`` statement marks each one done in the source database (``:key``).
  The commit and the update cannot be one transaction (two databases), so each row's
  message carries a mark (its key) in medrelay's store: a row read again because a crash
  came between the two is answered as a duplicate and only updated. The mark goes once
  the update is committed.

A row that cannot be made into a message (a template naming a column the row lacks, a
FHIR resource that does not validate) stops the poll there (``on_error: stop``, retried
each poll) or is passed over with an audit event naming its key (``on_error: skip``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import re
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Literal

import structlog
from pydantic import Field, field_validator, model_validator
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url

from engine.components import ComponentConfig, secret_field
from engine.context import ComponentContext
from engine.hl7.ack import new_control_id
from engine.mapping.hl7 import HL7, Hl7Document
from engine.registry import component
from engine.store import sources
from listeners.hl7_receive import Hl7Receiver, _Checked
from listeners.ingest import FhirIngest, marking

log = structlog.get_logger()

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_IDENT = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$"
ERROR_LOG_EVERY = 60.0


class Hl7RowConfig(ComponentConfig):
    """How a row becomes an HL7 v2 message: the MSH from here, the row's values at HL7 positions."""

    message_type: str = Field("ORU^R01", pattern=r"^[A-Z0-9]{3}(\^[A-Z0-9]{3}(\^[A-Z0-9_]{3,7})?)?$",
                              description="MSH-9, e.g. ORU^R01 or ADT^A08^ADT_A01")
    version: str = Field("2.5", pattern=r"^2\.[1-9](\.[0-9])?$", description="MSH-12")
    sending_application: str = Field("MEDRELAY", max_length=180, description="MSH-3")
    sending_facility: str = Field("", max_length=180, description="MSH-4")
    receiving_application: str = Field("", max_length=180, description="MSH-5")
    receiving_facility: str = Field("", max_length=180, description="MSH-6")
    processing_id: str = Field("P", pattern=r"^[DPT]$", description="MSH-11")
    fields: dict[str, str] = Field(description=(
        "HL7 position -> value: text where {column} takes the row's value (escaped for HL7), e.g. "
        "{\"PID-3.1\": \"{mrn}\", \"OBX-5\": \"{result}\"}; segments are created in the order first named. "
        "MSH-10 defaults to a random control id; MSH-7 is the time of reading"))

    @field_validator("fields")
    @classmethod
    def _positions(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            try:
                p = HL7.compile_path(path, write=True)
            except ValueError as e:
                raise ValueError(f"fields: {e}") from None
            if p.segment == "MSH" and p.field in (9, 12, 18):
                raise ValueError(f"fields: {path}: set MSH-9/12 with message_type/version (MSH-18 is UTF-8)")
        return v


class DatabaseSourceConfig(ComponentConfig):
    """Poll a table or a query for new rows; each row becomes an HL7 v2 message, a FHIR resource or a JSON envelope."""

    type: Literal["database"]
    url: str = secret_field(description="SQLAlchemy URL of the source database, e.g. \"${LIS_DB_URL}\" "
                            "(postgresql+psycopg://user:pw@host/db; the password stays out of the YAML)")
    table: str | None = Field(None, pattern=_IDENT, description="the table (or schema.table) to read; or query")
    query: str | None = Field(None, description="a SELECT giving the rows (read as a subquery: medrelay adds "
                              "the key condition, order and limit); or table")
    key: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="the key column: unique, and in cursor "
                     "mode increasing with every new row (a serial id, a sequence)")
    where: str | None = Field(None, description="an extra SQL condition on the rows, e.g. \"status = 'F'\"")
    mode: Literal["cursor", "update"] = Field(
        "cursor", description="cursor = rows with a key after the last one committed (kept in medrelay's store, "
        "moved in the same transaction as the messages); update = rows the query selects, each marked done "
        "in the source by `update` after its commit")
    update: str | None = Field(None, description="mode update: the statement run after a row's commit, with "
                               ":key, e.g. \"UPDATE orders SET sent = true WHERE id = :key\"")
    start_after: int | str | None = Field(None, description="mode cursor: the key to start after on a first "
                                          "run (default: from the first row)")
    output: Literal["hl7v2", "fhir", "json"] = Field(
        "json", description="what a row becomes: hl7v2 (per `hl7`), fhir (per `fhir_template`), json (a FHIR "
        "Parameters resource, one parameter per column)")
    hl7: Hl7RowConfig | None = Field(None, description="output hl7v2: the MSH and the positions of the values")
    fhir_template: dict[str, Any] | None = Field(
        None, description="output fhir: the resource, where a string \"{column}\" takes the value as it is "
        "(number, true/false, a time) and text with {column} in it takes it as text")
    fhir: Literal["create", "route"] = Field(
        "route", description="output fhir/json: create = also written to medrelay's FHIR store, route = only "
        "stored as a message and routed")
    batch_size: int = Field(100, ge=1, le=10000, description="rows read per query (a poll goes on while "
                            "full batches come back)")
    poll_interval: float = Field(5.0, gt=0, le=86400, description="seconds between polls when no rows were left")
    on_error: Literal["stop", "skip"] = Field(
        "stop", description="a row that cannot be made into a message: stop there (retried each poll) or skip "
        "it with an audit event naming its key")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to connect to the source database")

    @model_validator(mode="after")
    def _consistent(self) -> DatabaseSourceConfig:
        if (self.table is None) == (self.query is None):
            raise ValueError("give either table or query")
        if self.mode == "update" and not self.update:
            raise ValueError("mode update needs an `update` statement with :key")
        if self.update and ":key" not in self.update:
            raise ValueError("update: the statement must use :key")
        if self.output == "hl7v2" and self.hl7 is None:
            raise ValueError("output hl7v2 needs `hl7` (message_type and fields)")
        if self.output == "fhir" and not self.fhir_template:
            raise ValueError("output fhir needs `fhir_template`")
        if self.output == "fhir" and not isinstance((self.fhir_template or {}).get("resourceType"), str):
            raise ValueError("fhir_template needs a resourceType")
        return self

    @property
    def message_kind(self) -> str:
        return "hl7v2" if self.output == "hl7v2" else "fhir"

    def select_sql(self) -> str:
        """The statement of one poll (``:after`` in cursor mode, ``:limit``)."""
        source = self.table if self.table else f"({self.query}) AS medrelay_rows"
        conds = []
        if self.mode == "cursor":
            conds.append(f"{self.key} > :after")
        if self.where:
            conds.append(f"({self.where})")
        where = f" WHERE {' AND '.join(conds)}" if conds else ""
        return f"SELECT * FROM {source}{where} ORDER BY {self.key} LIMIT :limit"

    def environment_problems(self, settings: Any) -> list[tuple[tuple[str, ...], str]]:
        """`medrelay check`: the database answers and the query parses (run with no row to return)."""
        try:
            eng = _engine(self.url, self.connect_timeout)
        except Exception as e:
            return [(("url",), f"not a usable database URL: {type(e).__name__}")]
        probe = self.select_sql().replace(" ORDER BY", " AND 1=0 ORDER BY", 1) if " WHERE " in \
            self.select_sql() else self.select_sql().replace(" ORDER BY", " WHERE 1=0 ORDER BY", 1)
        try:
            with eng.connect() as c:
                c.execute(text(probe), {"after": 0 if self.start_after is None else self.start_after, "limit": 1})
        except Exception as e:
            orig = getattr(e, "orig", None) or e
            first = str(orig).strip().splitlines()[0][:200] if str(orig).strip() else type(orig).__name__
            where = ("table",) if self.table else ("query",)
            if type(e).__name__ == "OperationalError" and "connect" in first.lower():
                where = ("url",)
            return [(where, f"the source database refused the query: {first}")]
        finally:
            eng.dispose()
        return []


def _engine(url: str, timeout: float) -> Engine:
    u = make_url(url)
    args: dict[str, Any] = {}
    if u.get_backend_name() == "postgresql":
        args["connect_timeout"] = int(max(timeout, 1))
    elif u.get_backend_name() == "sqlite":
        args["timeout"] = timeout
    return create_engine(u, pool_pre_ping=True, connect_args=args, pool_size=2, max_overflow=0) \
        if u.get_backend_name() != "sqlite" else create_engine(u, connect_args=args)


# -- row values ---------------------------------------------------------------------------
def key_json(v: Any) -> Any:
    """A key as the cursor keeps it (JSON; times tagged so they come back as times)."""
    if isinstance(v, dt.datetime):
        return {"datetime": v.isoformat()}
    if isinstance(v, dt.date):
        return {"date": v.isoformat()}
    if isinstance(v, Decimal):
        return {"decimal": str(v)}
    if v is None:
        raise RowError("the row's key is NULL")
    if isinstance(v, bool | int | float | str):
        return v
    raise ValueError(f"a key of type {type(v).__name__} cannot be a cursor (use a number, text or a time)")


def key_value(j: Any) -> Any:
    if isinstance(j, dict):
        if "datetime" in j:
            return dt.datetime.fromisoformat(j["datetime"])
        if "date" in j:
            return dt.date.fromisoformat(j["date"])
        if "decimal" in j:
            return Decimal(j["decimal"])
    return j


def _hl7_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, dt.datetime):
        return v.strftime("%Y%m%d%H%M%S") + (v.strftime("%z") if v.tzinfo else "")
    if isinstance(v, dt.date):
        return v.strftime("%Y%m%d")
    if isinstance(v, bool):
        return "Y" if v else "N"
    if isinstance(v, bytes | memoryview):
        return bytes(v).decode("utf-8", "replace")
    return str(v)


def _json_value(v: Any) -> Any:
    if isinstance(v, dt.datetime):  # FHIR: a time of day needs a zone; a naive one is this machine's
        return (v if v.tzinfo else v.astimezone()).isoformat()
    if isinstance(v, dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, bytes | memoryview):
        return base64.b64encode(bytes(v)).decode()
    return v


class RowError(ValueError):
    """This row cannot be made into a message (what is wrong names columns, never values)."""


def fill(template: str, row: Mapping[str, Any], render: Any = _hl7_text) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in row:
            raise RowError(f"the template names column {name!r}, which the row does not have")
        return render(row[name])

    return _PLACEHOLDER.sub(sub, template)


def fill_json(node: Any, row: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        return {k: fill_json(v, row) for k, v in node.items()}
    if isinstance(node, list):
        return [fill_json(v, row) for v in node]
    if isinstance(node, str):
        m = _PLACEHOLDER.fullmatch(node)
        if m:
            if m.group(1) not in row:
                raise RowError(f"the template names column {m.group(1)!r}, which the row does not have")
            return _json_value(row[m.group(1)])
        return fill(node, row, lambda v: "" if v is None else str(_json_value(v)))
    return node


def hl7_message(cfg: Hl7RowConfig, row: Mapping[str, Any], now: dt.datetime | None = None) -> bytes:
    """The row as an HL7 v2 message (UTF-8, MSH-18 UNICODE UTF-8)."""
    ts = (now or dt.datetime.now().astimezone()).strftime("%Y%m%d%H%M%S%z")
    from engine.hl7.message import escape

    msh = ["MSH", "^~\\&", escape(cfg.sending_application), escape(cfg.sending_facility),
           escape(cfg.receiving_application), escape(cfg.receiving_facility), ts, "", cfg.message_type,
           new_control_id(), cfg.processing_id, cfg.version, "", "", "", "", "", "UNICODE UTF-8"]
    doc = Hl7Document("|".join(msh) + "\r")
    for path, template in cfg.fields.items():
        doc.write(HL7.compile_path(path, write=True), fill(template, row), {})
    return doc.text().encode("utf-8")


def parameters(row: Mapping[str, Any], table: str) -> dict[str, Any]:
    """The JSON envelope: a FHIR Parameters resource, one parameter per column (value[x] by type)."""
    params = []
    for name, v in row.items():
        p: dict[str, Any] = {"name": str(name)}
        if v is None:
            pass
        elif isinstance(v, bool):
            p["valueBoolean"] = v
        elif isinstance(v, int):
            p["valueInteger" if -2**31 <= v < 2**31 else "valueString"] = v if -2**31 <= v < 2**31 else str(v)
        elif isinstance(v, float | Decimal):
            p["valueDecimal"] = float(v)
        elif isinstance(v, dt.datetime):
            p["valueDateTime"] = (v if v.tzinfo else v.astimezone()).isoformat()
        elif isinstance(v, dt.date):
            p["valueDate"] = v.isoformat()
        elif isinstance(v, bytes | memoryview):
            p["valueBase64Binary"] = base64.b64encode(bytes(v)).decode()
        else:
            p["valueString"] = str(v)
        params.append(p)
    return {"resourceType": "Parameters", "meta": {"tag": [{"system": "urn:medrelay:source", "code": table[:64]}]},
            "parameter": params}


# -- the source -------------------------------------------------------------------------
class DatabaseListener:
    """One polling task per channel; reads in a worker thread, submits in order, waits for the commits."""

    def __init__(self, config: DatabaseSourceConfig, ctx: ComponentContext) -> None:
        if ctx.intake is None:
            raise ValueError("the database source needs the engine intake")
        self.config = config
        self.ctx = ctx
        self.channel = ctx.channel
        u = make_url(config.url)
        self.peer = f"{u.get_backend_name()}:{u.host or ''}/{(u.database or '').rsplit('/', 1)[-1]}"[:256]
        self.label = config.table or "query"
        self.hl7 = Hl7Receiver(ctx) if config.output == "hl7v2" else None
        self.fhir = FhirIngest(ctx, mode=config.fhir) if config.output != "hl7v2" else None
        self._engine: Engine | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.serving = False
        self.committed = 0
        self._again = False
        self._logged: dict[str, float] = {}

    @property
    def address(self) -> tuple[str, int]:
        u = make_url(self.config.url)
        return str(u.host or u.get_backend_name()), int(u.port or 0)

    async def start(self) -> None:
        self._engine = _engine(self.config.url, self.config.connect_timeout)
        self.serving = True
        self._task = asyncio.create_task(self._run(), name=f"database-{self.channel}")
        log.info("database.polling", channel=self.channel, mode=self.config.mode, output=self.config.output,
                 source=self.peer)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        self.serving = False
        if self._engine is not None:
            await asyncio.to_thread(self._engine.dispose)

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            delay = self.config.poll_interval
            try:
                more = await self.poll()
                failures = 0
                if more:
                    delay = 0.0
            except Exception as e:  # the source database away: retry, bounded backoff
                failures += 1
                delay = min(self.config.poll_interval * 2 ** min(failures, 6), 300.0)
                orig = getattr(e, "orig", None) or e
                self._warn("database.poll_failed", error=type(orig).__name__, retry_in=delay)
            if delay:
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                except TimeoutError:
                    pass

    def _warn(self, event: str, **kw: Any) -> None:
        now = time.monotonic()
        if now - self._logged.get(event, 0.0) >= ERROR_LOG_EVERY:
            self._logged[event] = now
            log.warning(event, channel=self.channel, **kw)

    # -- one poll ---------------------------------------------------------------------
    async def poll(self) -> bool:
        """Read one batch and commit it; True when the batch was full (more may be waiting)."""
        cfg = self.config
        after = None
        if cfg.mode == "cursor":
            after = await asyncio.to_thread(self._read_cursor)
        rows = await asyncio.to_thread(self._fetch, after)
        if not rows:
            return False
        self._again = False
        if cfg.mode == "cursor":
            done = await self._commit_cursor(rows, after)
        else:
            done = await self._commit_update(rows)
        return self._again or (done == len(rows) and len(rows) == cfg.batch_size)

    def _read_cursor(self) -> Any:
        with self.ctx.store.engine.connect() as conn:
            j = sources.read_cursor(conn, self.channel)
        return j

    def _fetch(self, after_json: Any) -> list[dict[str, Any]]:
        cfg = self.config
        assert self._engine is not None
        after = key_value(after_json)
        if after is None:
            after = cfg.start_after
        sql = cfg.select_sql()
        if cfg.mode == "cursor" and after is None:
            sql = sql.replace(f"{cfg.key} > :after AND ", "").replace(f" WHERE {cfg.key} > :after", "")
        with self._engine.connect() as c:
            res = c.execute(text(sql), {"after": after, "limit": cfg.batch_size})
            return [dict(r) for r in res.mappings()]

    def _message(self, row: Mapping[str, Any]) -> bytes:
        cfg = self.config
        if cfg.key not in row:
            raise RowError(f"the rows have no key column {cfg.key!r}")
        if cfg.output == "hl7v2":
            assert cfg.hl7 is not None
            return hl7_message(cfg.hl7, row)
        doc = fill_json(cfg.fhir_template, row) if cfg.output == "fhir" else parameters(row, self.label)
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    async def _submit(self, payload: bytes, hook: Any, mark: str | None) -> tuple[str, str]:
        """(ok | refused | retry, why): HL7 through the receiver, FHIR/JSON through the FHIR ingest.
        ``refused``: the row's message is wrong (its content); ``retry``: the engine could not commit it."""
        if self.hl7 is not None:
            checked = self.hl7.check(payload)
            if not isinstance(checked, _Checked):
                return "refused", checked.reason
            a = await self.hl7.store(checked, self.peer, tx_hook=marking(self.channel, mark, hook))
            return ("ok" if a.ok else "retry" if a.retryable else "refused"), a.reason
        assert self.fhir is not None
        f = await self.fhir.submit(payload, self.peer, mark=mark, tx_hook=hook)
        if f.ok:
            return "ok", ""
        issue = ((f.outcome or {}).get("issue") or [{}])[0]
        why = f"FHIR {f.status} {issue.get('code', '')}: {str(issue.get('diagnostics', ''))[:200]}"
        return ("retry" if f.retryable else "refused"), why

    def _build(self, row: Mapping[str, Any]) -> tuple[Any, bytes | None, str]:
        """(key as the cursor keeps it, the message or None, why not)."""
        try:
            key = key_json(row.get(self.config.key))
        except (RowError, ValueError) as e:
            return None, None, str(e)
        try:
            return key, self._message(row), ""
        except (RowError, ValueError) as e:
            return key, None, str(e)

    async def _commit_cursor(self, rows: list[dict[str, Any]], after: Any) -> int:
        """Submit in key order, together (they share group commits); each commit moves the cursor
        from the previous row's key to its own. After the first row that did not commit, nothing
        did (compare-and-set): a refused row is skipped (``on_error: skip``, audited, the cursor
        moved past it alone) or stops the feed there; the rest is read again by the next poll."""
        cfg = self.config
        prev = after
        planned: list[tuple[Any, Any, bytes | None, str]] = []  # (prev, key, payload, why)
        for row in rows:
            key, payload, why = self._build(row)
            planned.append((prev, key, payload, why))
            if payload is None:
                break  # nothing after a row that cannot be built may commit before it is decided
            prev = key
        ready = [p for p in planned if p[2] is not None]
        results = await asyncio.gather(*(self._submit(payload, _advance(self.channel, pv, k), None)
                                         for pv, k, payload, _ in ready))
        outcomes = [*results, *([("refused", planned[-1][3])] if planned[-1][2] is None else [])]
        done = 0
        for (pv, key, _, _), (state, why) in zip(planned, outcomes, strict=True):
            if state == "ok":
                done += 1
                continue
            if state == "refused" and cfg.on_error == "skip" and key is not None:
                if await asyncio.to_thread(self._skip, pv, key, why):
                    self.committed += done
                    self._again = True  # the rows after it are read again at once
                    return done + 1
            event = "database.row_refused" if state == "refused" else "database.row_not_committed"
            self._warn(event, key=str(key)[:64], reason=why[:200],
                       note="stopped here" if state == "refused" else "retried next poll")
            break
        self.committed += done
        return done

    def _skip(self, prev: Any, key: Any, reason: str) -> bool:
        try:
            with self.ctx.store.engine.begin() as conn:
                sources.advance_cursor(conn, self.channel, prev, key)
                self.ctx.audit.record("source.row_skipped", outcome="failure", channel=self.channel,
                                      peer=self.peer, detail=f"key {str(key)[:64]}: {reason[:300]}", conn=conn)
        except sources.CursorMoved:
            return False
        log.warning("database.row_skipped", channel=self.channel, key=str(key)[:64], reason=reason[:200])
        return True

    async def _commit_update(self, rows: list[dict[str, Any]]) -> int:
        """One row at a time with a mark each, then the update for the committed ones, then their marks go."""
        cfg = self.config
        done_keys: list[Any] = []
        for row in rows:
            key = row.get(cfg.key)
            jkey, payload, why = self._build(row)
            state = "refused"
            if payload is not None:
                state, why = await self._submit(payload, None, "row:" + json.dumps(jkey, sort_keys=True))
            if state == "ok":
                done_keys.append(key)
                continue
            if state == "refused" and cfg.on_error == "skip" and jkey is not None:
                await asyncio.to_thread(self.ctx.audit.record, "source.row_skipped", outcome="failure",
                                        channel=self.channel, peer=self.peer,
                                        detail=f"key {str(jkey)[:64]}: {why[:300]}")
                log.warning("database.row_skipped", channel=self.channel, key=str(jkey)[:64], reason=why[:200])
                done_keys.append(key)
                continue
            self._warn("database.row_refused" if state == "refused" else "database.row_not_committed",
                       key=str(jkey)[:64], reason=why[:200])
            break
        if done_keys:
            await asyncio.to_thread(self._mark_done, done_keys)
        self.committed += len(done_keys)
        return len(done_keys)

    def _mark_done(self, keys: list[Any]) -> None:
        cfg = self.config
        assert self._engine is not None and cfg.update is not None
        with self._engine.begin() as c:
            for k in keys:
                c.execute(text(cfg.update), {"key": k})
        with self.ctx.store.engine.begin() as conn:
            sources.unmark(conn, self.channel, ["row:" + json.dumps(key_json(k), sort_keys=True) for k in keys])


def _advance(channel: str, prev: Any, key: Any) -> Any:
    def hook(conn: Connection, env: Any) -> None:
        sources.advance_cursor(conn, channel, prev, key)

    return hook


@component("source", "database", config=DatabaseSourceConfig)
def build(config: DatabaseSourceConfig, ctx: ComponentContext) -> DatabaseListener:
    """Database poller: new rows of a table or query as HL7 v2, FHIR or JSON messages, never one twice."""
    return DatabaseListener(config, ctx)


__all__ = ["DatabaseListener", "DatabaseSourceConfig", "build"]
