"""The `medrelay` command: run, check, test, messages, replay, keys, components."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import structlog

from engine import logging as mlog
from engine.config import ConfigError, Settings, load_settings

CONFIG_HELP = "channels.yaml to use (or $MEDRELAY_CONFIG)"

# One table for every command, so a script can rely on it; each command's --help adds its own 1.
EXIT_CODES = """\b
Exit codes (every command):
  0  done
  1  done, but not everything succeeded (see the command), or an unexpected error
     (one line; MEDRELAY_DEBUG=1 shows the traceback)
  2  usage: a wrong command, option or argument; the config's YAML or schema is wrong
  3  the config's topology is wrong (duplicate names, wrong message kinds, unknown
     routing keys, a port used twice)
  4  environment: a ${VAR} not set, a file missing or malformed (the key file),
     the store or the engine not reachable, a port already in use
  141  standard output closed by its reader (`| head`): nothing more is printed"""


class _Main(click.Group):
    """The `medrelay` group: an unexpected error is one line and exit 1, never a traceback."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:  # `medrelay --help | head -1`: the group's own help is printed while parsing, before invoke
            return super().make_context(info_name, args, parent, **extra)
        except BrokenPipeError as e:
            from engine.cli.exits import broken_stdout, quiet_exit

            if broken_stdout(e):
                quiet_exit()
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            from engine.cli.exits import broken_stdout, quiet_exit
            from engine.security.crypto import KeyFileError

            if broken_stdout(e):  # `medrelay messages list | head`: the reader has enough
                quiet_exit()
            if os.environ.get("MEDRELAY_DEBUG"):
                raise
            if isinstance(e, KeyFileError):  # every command that reads the key file says the same
                click.echo(f"medrelay: {e}", err=True)
                sys.exit(4)
            if type(e).__module__.startswith("sqlalchemy"):
                click.echo(f"medrelay: the store is not available: {_reason(e)}", err=True)
                sys.exit(4)
            click.echo(f"medrelay: {_reason(e)} (MEDRELAY_DEBUG=1 shows the traceback)", err=True)
            sys.exit(1)


def _load(config: str, need_env: bool = True, create_secrets: bool = False) -> Settings:
    try:
        return load_settings(config, need_env=need_env, create_secrets=create_secrets)
    except ConfigError as e:
        for p in e.problems:
            click.echo(str(p), err=True)
        sys.exit(e.exit_code)


def _open_store(config: str, settings: Settings | None = None) -> Any:
    """The store of CONFIG for an offline command; a clear message and exit 4 when it cannot open."""
    from engine.runtime import open_store
    from engine.security.crypto import KeyFileError
    from engine.store.db import SCHEMA_VERSION

    settings = settings or _load(config, need_env=False)
    try:
        store = open_store(settings, migrate=False)
        have = store.version()
        if 0 < have < SCHEMA_VERSION and _engine_running(store):
            # an older engine runs on it: migrating under it would leave it unable to restart or
            # reload, so the upgrade is the engine's (docs/deployment.md "Upgrades")
            click.echo(f"{config}: the store's schema is version {have} and an engine runs on it; this medrelay "
                       f"needs version {SCHEMA_VERSION}. Restart the engine with this medrelay first (it upgrades "
                       "the store), then run this command again", err=True)
            sys.exit(4)
        store.migrate()
        return store
    except KeyFileError:
        raise  # the one key-file sentence, from _Main
    except Exception as e:
        click.echo(f"{config}: cannot open the store: {_reason(e)}", err=True)
        sys.exit(4)


def _reason(e: BaseException) -> str:
    """One line for a person: the driver's own message, without SQLAlchemy's wrapping or a traceback."""
    orig = getattr(e, "orig", None) or e
    return f"{type(orig).__name__}: {str(orig).strip().splitlines()[0][:300] if str(orig).strip() else ''}"


def _config_option(f: Any) -> Any:
    return click.option("-c", "--config", "config", default=lambda: os.environ.get("MEDRELAY_CONFIG",
                        "channels.yaml"), show_default="channels.yaml", help=CONFIG_HELP)(f)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="medrelay")
def main() -> None:
    """medrelay: a DICOM / HL7v2 / FHIR interface engine.

    Receives over DICOM, MLLP and FHIR REST, stores every message durably and
    encrypted, then routes, transforms and delivers it with retries.
    """
    mlog.configure("warning", "auto")  # `run` reconfigures from the YAML's log section


# -- run ----------------------------------------------------------------
@main.command()
@click.argument("config", default=lambda: os.environ.get("MEDRELAY_CONFIG", "channels.yaml"))
def run(config: str) -> None:
    """Run the engine on CONFIG until SIGTERM/SIGINT (drains), reloading on SIGHUP.

    A reload whose new config is invalid is refused and the old one keeps running.
    A `${generated:PATH}` secret that does not exist yet is created first (a random
    token, mode 0600) and its path logged: clients read it from there.

    Exit 0 after a drain; 2, 3 or 4 for a config that `medrelay check` refuses; 4 when
    the engine cannot start (a port already in use, the store not reachable, another
    engine on the same SQLite store).
    """
    from engine.runtime import StartError

    settings = _load(config, create_secrets=True)
    mlog.configure(settings.log.level, settings.log.format)
    _log_generated(settings)
    try:
        asyncio.run(_serve(config, settings))
    except StartError as e:  # names the channel, host and port
        structlog.get_logger().error("engine.start_failed", error=str(e))
        sys.exit(4)
    except (OSError, RuntimeError) as e:  # another engine on the store, a key file unreadable
        structlog.get_logger().error("engine.start_failed", error=_reason(e))
        sys.exit(4)
    except Exception as e:
        if type(e).__module__.startswith("sqlalchemy"):
            structlog.get_logger().error("engine.store_unavailable", error=_reason(e))
            sys.exit(4)
        raise


def _log_generated(settings: Settings) -> None:
    for p, made in settings.generated_secrets.items():
        if made:
            structlog.get_logger().warning("secret.generated", path=str(p),
                                           note="a new random token, mode 0600; clients read it from this file")


async def _start(settings: Settings, *, reloading: bool = False) -> Any:
    """A started Runtime; one that fails half-way is stopped again (workers, store, lock) first.
    ``reloading``: a SIGHUP restart, which goes on beside a schema a newer engine migrated."""
    from engine.runtime import Runtime

    runtime = Runtime(settings, reloading=reloading)
    try:
        await runtime.start()
    except Exception:
        try:
            await runtime.stop()
        except Exception as e:  # the start error is the one to report
            structlog.get_logger().warning("engine.stop_after_failed_start", error=_reason(e))
        raise
    return runtime


async def _serve(path: str, settings: Settings) -> None:
    from engine.runtime import StartError

    log = structlog.get_logger()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_req = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_req.set)
    runtime = await _start(settings)
    while not stop.is_set():
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(reload_req.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if reload_req.is_set() and not stop.is_set():
            reload_req.clear()
            try:
                new = load_settings(path, create_secrets=True)
            except ConfigError as e:
                log.error("config.reload_refused", problems=[str(p) for p in e.problems])
                continue
            log.info("config.reloading", config_hash=new.config_hash[:12])
            _log_generated(new)
            await runtime.stop()
            try:
                runtime = await _start(new, reloading=True)
            except (StartError, OSError, RuntimeError) as e:  # e.g. a new port already taken
                log.error("config.reload_failed", error=str(e) if isinstance(e, StartError) else _reason(e),
                          note="the previous config runs again")
                runtime = await _start(settings, reloading=True)
                continue
            settings = new
            runtime.audit.record("config.change", actor="medrelay", detail=new.config_hash)
    log.info("engine.draining")
    await runtime.stop()


# -- check --------------------------------------------------------------
@main.command()
@click.argument("config", default=lambda: os.environ.get("MEDRELAY_CONFIG", "channels.yaml"))
@click.option("--connect", is_flag=True, help="also open a connection to the store (exit 4 when it cannot be "
              "reached); without it check is offline")
def check(config: str, connect: bool = False) -> None:
    """Validate CONFIG: schema, then topology, then environment.

    Each problem is one line, `file:line: dotted.path: message`. Exit codes: 0 valid,
    2 YAML/schema error, 3 topology error (duplicate names, a transform given the
    wrong kind of message, a `when:` or `debounce.key` key the source's messages
    cannot have, a port used twice), 4 environment (a ${VAR} not set, a file missing).
    When problems of several phases are found, the first phase decides the code.

    Offline by default (a lint that runs in CI without the database): the store, peers
    and ports are not contacted. --connect also connects to the store and exits 4 with
    the driver's reason when it cannot be reached (what `run` would say).
    """
    from engine.config import TLS_FILES, dotted, tls_blocks

    settings = _load(config)
    problems = []
    for path, block in tls_blocks(settings.raw):  # every tls: (sources, routes, peers, audit.syslog)
        for attr in TLS_FILES:
            f = block.get(attr)
            if f and not settings.resolve(f).exists():
                line = settings.line_of.get((*path, attr)) or settings.line_of.get(path)
                where = f"{config}:{line}" if line else config
                problems.append(f"{where}: {dotted((*path, attr))}: file not found: {f}")
    for cname, ch in settings.channels.items():  # sources that check their own surroundings (folders, databases)
        env_check = getattr(ch.source, "environment_problems", None)
        for sub, msg in env_check(settings) if env_check is not None and ch.enabled else ():
            path = ("channels", cname, "source", *sub)
            line = next((settings.line_of[path[:n]] for n in range(len(path), 0, -1) if path[:n] in settings.line_of),
                        None)
            problems.append(f"{config}:{line}: {dotted(path)}: {msg}" if line else f"{config}: {dotted(path)}: {msg}")
    for p in problems:
        click.echo(p, err=True)
    if problems:
        sys.exit(4)
    if connect:
        _check_connect(config, settings)
    n_routes = sum(len(c.routes) for c in settings.channels.values())
    click.echo(f"{config}: ok ({len(settings.channels)} channels, {n_routes} routes, "
               f"config hash {settings.config_hash[:12]})")
    for p in settings.pending_secrets:
        click.echo(f"{config}: {p} does not exist yet: `medrelay run` creates it (${{generated:...}})")


def _check_connect(config: str, settings: Settings) -> None:
    """`check --connect`: the store reachable, or its reason and exit 4 (as `run` would refuse)."""
    from engine.cli.exits import store_problem

    why = store_problem(settings)
    if why is not None:
        click.echo(f"{config}: store: cannot be reached: {why}", err=True)
        sys.exit(4)


# -- messages -------------------------------------------------------------
def _parse_time(s: str | None) -> float | None:
    from engine.messages import parse_time

    return parse_time(s)  # the API's own reading of a time, so both take the same values


def _time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--since/--until checked when the command line is read: a usage error (exit 2), not a traceback."""
    try:
        _parse_time(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected an ISO time (2026-11-22T10:15) or an age like "
                                 "15m, 2h, 7d") from None
    return value


@main.group()
def messages() -> None:
    """List and inspect stored messages and their deliveries."""


@messages.command("list")
@_config_option
@click.option("--channel", help="only this channel")
@click.option("--route", help="only messages with a delivery on this route")
@click.option("--state", type=click.Choice(["pending", "done", "dead", "filtered", "superseded", "quarantined"]),
              help="only messages with a delivery in this state")
@click.option("--since", callback=_time_option, help="ISO time or age like 15m, 2h, 7d")
@click.option("--until", callback=_time_option, help="ISO time or age")
@click.option("--patient-id", help="HL7 PID-3/PID-2, DICOM PatientID, FHIR Patient identifier (blind index)")
@click.option("--accession", help="HL7 ORC-2/3, OBR-2/3/18, IPC-1; DICOM AccessionNumber (blind index)")
@click.option("--control-id", help="HL7 MSH-10 (blind index)")
@click.option("--study-uid", help="DICOM StudyInstanceUID, HL7 IPC-3/ZDS-1 (blind index)")
@click.option("-q", "--q", "q", help="content search in the decrypted payloads of the rows the other filters "
              "select (bounded; audited)")
@click.option("--cursor", help="go on from a previous listing's `next:` cursor")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1, max=500))
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def messages_list(config: str, channel: str | None, route: str | None, state: str | None,
                  since: str | None, until: str | None, limit: int, as_json: bool, patient_id: str | None = None,
                  accession: str | None = None, control_id: str | None = None, study_uid: str | None = None,
                  q: str | None = None, cursor: str | None = None) -> None:
    """List messages, newest first (headers only: no PHI), with the admin API's filters.

    Exit 0, 2 for a bad cursor, 4 when the store cannot open.
    """
    from engine.audit.trail import Audit
    from engine.messages import MessageFilter, QueryError, query_messages

    store = _open_store(config)
    f = MessageFilter(channel=channel, route=route, state=state, since=_parse_time(since), until=_parse_time(until),
                      patient_id=patient_id, accession=accession, control_id=control_id, study_uid=study_uid, q=q)
    try:
        page = query_messages(store, f, limit=limit, cursor=cursor)
    except QueryError as e:
        click.echo(f"messages list: {e}", err=True)
        sys.exit(2)
    if q:
        s = page.search or {}
        Audit(store).record("message.search", actor=os.environ.get("USER", "cli"), channel=channel,
                            detail=f"content search: {s.get('scanned', 0)} scanned, {s.get('matched', 0)} matched; "
                                   f"filters {','.join(f.used())}")
    for r in page.rows:
        if as_json:
            click.echo(json.dumps(r, default=str))
        else:
            at = datetime.fromtimestamp(r["received_at"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            dl = " ".join(f"{d['route']}={d['state']}" for d in r["deliveries"])
            click.echo(f"{r['id']}  {at}  {r['channel']:<14} {r['kind']:<6} {r['summary']:<28} {dl}")
    if page.search and not as_json:
        s = page.search
        click.echo(f"searched {s['scanned']} messages" + ("" if s["complete"] else f" (stopped: {s['stopped']})"),
                   err=True)
    if page.next_cursor:
        click.echo(f"next: --cursor {page.next_cursor}", err=True)


@messages.command("reindex")
@_config_option
@click.option("--batch", default=200, show_default=True, type=click.IntRange(1, 5000))
def messages_reindex(config: str, batch: int) -> None:
    """Fill in the blind search terms of messages stored before the index (or its key) existed.

    Safe while the engine runs (the console also does it in the background) and resumable:
    each batch is one transaction. Exit 0.
    """
    from tqdm import tqdm

    from engine.store import message_terms

    store = _open_store(config)
    total = 0
    with tqdm(unit="msg", desc="reindex", file=sys.stderr) as bar:
        while n := message_terms.reindex(store, batch=batch):
            total += n
            bar.update(n)
    click.echo(f"indexed {total} messages")


@messages.command("show")
@_config_option
@click.argument("message_id")
@click.option("--phi", is_flag=True, help="also print the payload (contains PHI; audited)")
def messages_show(config: str, message_id: str, phi: bool) -> None:
    """Show one message: headers, deliveries with attempts and errors; payload with --phi.

    Exit 0, 1 when there is no such message.
    """
    from engine.audit.trail import Audit
    from engine.messages import show_message

    store = _open_store(config)
    info = show_message(store, message_id, with_payload=phi)
    if info is None:
        click.echo(f"no message {message_id}", err=True)
        sys.exit(1)
    payload = info.pop("payload", None)
    click.echo(json.dumps(info, indent=2, default=str))
    if phi and payload is not None:
        Audit(store).record("message.export", actor=os.environ.get("USER", "cli"), message_id=message_id,
                            channel=info["channel"], detail="payload shown with --phi")
        click.echo("--- payload ---")
        text = payload.decode("latin-1") if info["kind"] != "dicom" else f"<{len(payload)} bytes DICOM>"
        click.echo(text.replace("\r", "\n"))


# -- replay -------------------------------------------------------------------
@main.command()
@_config_option
@click.argument("message_ids", nargs=-1)
@click.option("--channel")
@click.option("--route")
@click.option("--state", "states", multiple=True, default=("dead",), show_default=True,
              type=click.Choice(["dead", "done", "filtered", "pending", "quarantined", "superseded"]),
              help="which deliveries to send again")
@click.option("--since", callback=_time_option, help="received at or after: ISO time or age like 2h")
@click.option("--until", callback=_time_option, help="received before: ISO time or age")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="wait for the running engine to deliver them, with a progress bar")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=0),
              help="seconds to wait with --wait")
@click.option("-y", "--yes", is_flag=True, help="replay everything in the given states without asking")
@click.option("--diff", is_flag=True, help="send nothing: run the messages through CONFIG's routes and "
              "transforms and show, per message and route, what would change against --against")
@click.option("--against", default=lambda: os.environ.get("MEDRELAY_CONFIG", "channels.yaml"),
              show_default="channels.yaml", help="with --diff: the config to compare with (the running one)")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(min=1),
              help="with --diff: at most this many messages, newest first")
@click.option("--phi", is_flag=True, help="with --diff: print the output diffs (contain PHI; audited)")
def replay(config: str, message_ids: tuple[str, ...], channel: str | None, route: str | None,
           states: tuple[str, ...], since: str | None, until: str | None, wait: bool, timeout: float,
           yes: bool, diff: bool = False, against: str = "channels.yaml", limit: int = 200,
           phi: bool = False) -> None:
    """Send messages again: dead letters by default, or any state by filter.

    The deliveries are put back in the queue with attempts reset; the running engine
    (`medrelay run`) sends them. Without MESSAGE_IDS or a filter, every delivery in
    --state (dead letters) of every channel is replayed, after a confirmation that
    shows how many per route (--yes to skip it; required when not on a terminal).
    Exit 0 when all were delivered (with --wait), 1 otherwise or when not confirmed, 4 when
    no engine runs on the store (none at the start, or it stopped while waiting): the
    requeued deliveries stay queued and the next `medrelay run` sends them.
    A MESSAGE_ID that is not stored exits 1 (`no message ID`), a --channel or --route
    that neither the config nor the store knows exits 2, before anything is requeued;
    names that exist but select no delivery in --state print `nothing to replay` and
    exit 0 (nothing was wrong, nothing was waiting).

    With --diff nothing is requeued or sent: the messages go through CONFIG's routes and
    transforms and each route's result is compared with --against (exit 1 when any changes).
    """
    from tqdm import tqdm

    from engine import queue
    from engine.audit.trail import Audit

    if diff:  # `medrelay replay --config NEW.yaml --diff`: a review of a config change, nothing requeued
        explicit = click.get_current_context().get_parameter_source("states") != click.core.ParameterSource.DEFAULT
        _replay_diff(config, against, message_ids, channel, route, states[0] if explicit else None, since, until,
                     limit, phi)
    settings = _load(config, need_env=False)
    store = _open_store(config, settings)
    unknown = _replay_unknown(store, settings, message_ids, channel, route)
    if unknown is not None:
        click.echo(f"replay: {unknown[0]}", err=True)
        sys.exit(unknown[1])
    if not (message_ids or channel or route or since or until) and not yes:
        per_route = _deliveries_by_route(store, states)
        if not per_route:
            click.echo(f"nothing to replay: no delivery is {' or '.join(states)}")
            return
        listing = ", ".join(f"{c}/{r}: {n}" for (c, r), n in sorted(per_route.items()))
        question = (f"replay {sum(per_route.values())} {'/'.join(states)} deliveries of every channel "
                    f"({listing})?")
        if not sys.stdin.isatty():
            click.echo(f"{question} Not on a terminal: pass --yes, or name message ids or a "
                       "--channel/--route/--since/--until filter", err=True)
            sys.exit(2)
        if not click.confirm(question, default=False):
            click.echo("nothing replayed", err=True)
            sys.exit(1)
    from engine.messages import MessageFilter
    from engine.messages import replay as replay_deliveries

    ids = replay_deliveries(store, Audit(store), actor=os.environ.get("USER", "cli"),
                            message_ids=list(message_ids) or None, route=route, states=states,
                            selection=MessageFilter(channel=channel, since=_parse_time(since),
                                                    until=_parse_time(until)))
    if not ids:
        click.echo(f"nothing to replay: no {'/'.join(states)} delivery matches")
        return
    click.echo(f"requeued {len(ids)} deliveries")
    if _engine_running(store) is False:
        # Nothing would send them: say so now rather than wait out --timeout (exit 4 with --wait).
        click.echo(f"replay: no engine is running on this store: the {len(ids)} "
                   "deliveries stay queued and are sent when `medrelay run` starts", err=True)
        if wait:
            sys.exit(4)
        return
    if not wait:
        return
    deadline = time.monotonic() + timeout
    tty = sys.stderr.isatty()
    # Not a terminal (a log, CI): a progress line every 10 s at most, not a redraw every poll.
    with tqdm(total=len(ids), unit="msg", desc="replay", file=sys.stderr, mininterval=0.1 if tty else 10.0,
              maxinterval=10.0 if tty else 60.0) as bar:
        gone_since: float | None = None
        last_look = time.monotonic()
        while time.monotonic() < deadline:
            counts = queue.states_of(store, ids)
            finished = len(ids) - counts.get("pending", 0)
            bar.update(finished - bar.n)
            if finished >= len(ids):
                break
            now = time.monotonic()
            if now - last_look >= 2.0:  # the engine stopped while we wait: nothing will send the rest
                last_look = now
                gone_since = gone_since or now if _engine_running(store) is False else None
                if gone_since is not None and now - gone_since >= 4.0:
                    bar.close()
                    click.echo(f"replay: the engine stopped: {counts.get('pending', 0)} deliveries stay "
                               "queued and are sent when `medrelay run` starts", err=True)
                    sys.exit(4)
            time.sleep(0.2)
    counts = queue.states_of(store, ids)
    click.echo("result: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    sys.exit(0 if counts.get("done", 0) + counts.get("filtered", 0) == len(ids) else 1)


def _engine_running(store: Any) -> bool | None:
    """Whether an engine process runs on ``store``; None when that cannot be told.

    SQLite: an engine holds an exclusive flock on ``<db>.lock`` for its whole life
    (engine.runtime._single_owner_lock), so a lock we can take for an instant means none runs.
    PostgreSQL: an engine's presence lease or any lease it holds (engine/store/leases.py) says
    it runs; an engine without ordered routes or singletons holds none, so no lease is unknown.
    """
    import fcntl

    from engine.store.db import owner_lock_file
    from engine.store.leases import holders, live_engines

    if store.is_sqlite:
        db = store.url.database or ""
        if not db or db == ":memory:":
            return None
        with owner_lock_file(db) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    with store.engine.connect() as conn:
        return True if live_engines(conn) > 0 or holders(conn) else None


def _replay_unknown(store: Any, settings: Settings, message_ids: tuple[str, ...], channel: str | None,
                    route: str | None) -> tuple[str, int] | None:
    """(why, exit code) when a replay names something that does not exist, else None.

    A mistyped id or name must not look like a replay that found nothing to do. A name is
    known when the config has it or the store still holds deliveries of it (a route removed
    from the config keeps its dead letters).
    """
    from sqlalchemy import select

    from engine.store import schema

    m, d = schema.messages, schema.deliveries
    with store.engine.connect() as conn:
        if message_ids:
            found = set(conn.execute(select(m.c.id).where(m.c.id.in_(list(message_ids)))).scalars())
            missing = [i for i in message_ids if i not in found]
            if missing:
                return f"no message {', '.join(missing)}", 1
        if channel and channel not in settings.channels and conn.execute(
                select(d.c.id).where(d.c.channel == channel).limit(1)).first() is None:
            return (f"no channel {channel!r} in {settings.path} or the store (channels: "
                    f"{', '.join(settings.channels) or 'none'})", 2)
        if route:
            in_config = {r.name for c, ch in settings.channels.items() if not channel or c == channel
                         for r in ch.routes}
            q = select(d.c.id).where(d.c.route == route)
            if channel:
                q = q.where(d.c.channel == channel)
            if route not in in_config and conn.execute(q.limit(1)).first() is None:
                where = f"channel {channel!r}" if channel else "any channel"
                return f"no route {route!r} in {where} of {settings.path} or the store", 2
    return None


def _deliveries_by_route(store: Any, states: tuple[str, ...]) -> dict[tuple[str, str], int]:
    """How many deliveries are in ``states``, per (channel, route): what a bare `replay` would send."""
    from sqlalchemy import func, select

    from engine.store import schema

    d = schema.deliveries
    with store.engine.connect() as conn:
        rows = conn.execute(select(d.c.channel, d.c.route, func.count()).where(d.c.state.in_(list(states)))
                            .group_by(d.c.channel, d.c.route)).all()
    return {(c, r): n for c, r, n in rows}


# -- replay --diff: what a new config would do to stored messages -----------------------------
def _replay_diff(new_config: str, against: str, message_ids: tuple[str, ...], channel: str | None,
                 route: str | None, state: str | None, since: str | None, until: str | None, limit: int,
                 phi: bool) -> None:
    """Run stored messages through NEW's routes and transforms, nothing sent, and compare with AGAINST.

    The message's stamped config hash says whether AGAINST is the config it was routed under:
    then both sides are recomputed the same way; otherwise the old side is what the store
    recorded (which routes got a delivery) and old outputs are unknown. Output diffs contain
    patient data and are shown only with --phi (audited); without it a change is summarised
    by the segments, elements or attributes it touches.
    """
    import difflib
    import tempfile

    from tqdm import tqdm

    from engine import registry
    from engine.audit.trail import Audit
    from engine.context import ComponentContext
    from engine.envelope import Drop, Envelope
    from engine.match import matches
    from engine.messages import list_messages, show_message
    from engine.pipeline import apply_transforms
    from engine.security.crypto import KeyRing
    from engine.store.db import Store

    mlog.configure("error", "auto")
    new = _load(new_config, need_env=False)
    old = _load(against, need_env=False)
    store = _open_store(new_config, new)
    ids = list(message_ids) or [r["id"] for r in list_messages(store, channel=channel, route=route, state=state,
                                                             since=_parse_time(since), until=_parse_time(until),
                                                             limit=limit)]
    changed = 0
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Store(f"sqlite:///{tmp}/scratch.db", Path(tmp) / "blobs", KeyRing(Path(tmp) / "keys.json"))
        scratch.migrate()
        built: dict[tuple[int, str, str], Any] = {}

        def outcome(settings: Settings, env: Any, rc: Any) -> tuple[str, list[str]]:
            """("not routed" | "filtered: ..." | "fails: ..." | "routed", output lines)."""
            if not matches(dict(rc.when), env):
                return "not routed", []
            key = (id(settings), env.channel, rc.name)
            if key not in built:
                ctx = ComponentContext(settings=settings, store=scratch, keyring=scratch.keyring,
                                       audit=Audit(scratch), channel=env.channel, route=rc.name)
                built[key] = [registry.get("transform", t.type).factory(t, ctx) for t in rc.transforms]
            try:
                outs = apply_transforms(built[key], env)
            except Drop as d:
                return f"filtered: {d.reason}", []
            except Exception as e:
                return f"fails: {type(e).__name__}: {str(e)[:200]}", []
            return "routed", [ln for o in outs for ln in _map_render(o.kind, o.payload)]

        def summary(a: list[str], b: list[str]) -> str:
            names = []
            for ln in difflib.unified_diff(a, b, lineterm="", n=0):
                if ln[:1] in "+-" and not ln.startswith(("+++", "---")):
                    name = ln[1:].split("|", 1)[0].strip()[:24] if "|" in ln else ln[1:].strip().split(" ", 1)[0][:24]
                    if name not in names:
                        names.append(name)
            return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")

        for mid in tqdm(ids, unit="msg", desc="replay --diff", file=sys.stderr):
            info = show_message(store, mid, with_payload=True)
            if info is None or info.get("parent_id") or info.get("payload") is None:
                continue
            env = Envelope(channel=info["channel"], kind=info["kind"], payload=info["payload"],
                           headers=info["headers"] or {}, id=mid)
            exact = info["config_hash"] == old.config_hash
            stored = {d["route"] for d in info["deliveries"]}
            new_routes = {r.name: r for r in (new.channels.get(env.channel).routes if env.channel in new.channels
                                              else [])}
            old_routes = {r.name: r for r in (old.channels.get(env.channel).routes if env.channel in old.channels
                                              else [])}
            for name in sorted(set(new_routes) | set(old_routes) | stored):
                after, out_b = outcome(new, env, new_routes[name]) if name in new_routes else ("no route", [])
                if exact:
                    before, out_a = outcome(old, env, old_routes[name]) if name in old_routes else ("no route", [])
                else:
                    before, out_a = ("routed" if name in stored else "not routed"), None
                same = before == after and (out_a is None or out_a == out_b)
                if same and not (out_a is None and after == "routed"):
                    click.echo(f"{mid} {env.channel}/{name}: unchanged ({after})")
                    continue
                if out_a is None and before == after:
                    click.echo(f"{mid} {env.channel}/{name}: {after}; old output unknown (stamped config "
                               f"{info['config_hash'][:12]}, --against is {old.config_hash[:12]})")
                    continue
                changed += 1
                if before != after:
                    click.echo(f"{mid} {env.channel}/{name}: {before} -> {after}")
                else:
                    click.echo(f"{mid} {env.channel}/{name}: output changes ({summary(out_a or [], out_b)})")
                if phi and out_a is not None and out_a != out_b:
                    for ln in difflib.unified_diff(out_a, out_b, fromfile="old", tofile="new", lineterm=""):
                        click.echo("    " + ln)
        scratch.dispose()
    Audit(store).record("message.replay_diff", actor=os.environ.get("USER", "cli"), channel=channel,
                        detail=f"{len(ids)} messages compared, config {new.config_hash[:12]} against "
                               f"{old.config_hash[:12]}" + ("; outputs shown with --phi" if phi else ""))
    click.echo(f"{changed} route results would change in {len(ids)} messages")
    sys.exit(1 if changed else 0)


# -- keys -------------------------------------------------------------------
@main.group()
def keys() -> None:
    """Key-encryption keys: init, create, list, rotate."""


@keys.command("list")
@_config_option
def keys_list(config: str) -> None:
    """List KEKs, which is active, and how many data keys each wraps."""
    from engine.store.key_rotation import key_usage

    store = _open_store(config)
    usage = key_usage(store)
    for kid in store.keyring.kek_ids():
        mark = "*" if kid == store.keyring.active_id else " "
        click.echo(f"{mark} {kid}  blobs={usage.get(kid, 0)}")


@keys.command("create")
@_config_option
def keys_create(config: str) -> None:
    """Create the key file if it does not exist yet (mode 0600), and the store with it."""
    from engine.audit.trail import Audit

    settings = _load(config, need_env=False)
    path = settings.resolve(settings.keys.kek_file)
    existed = path.exists()
    store = _open_store(config, settings)
    Audit(store).record("keys.create", actor=os.environ.get("USER", "cli"),
                        detail=f"{'existing' if existed else 'new'} key file, active {store.keyring.active_id}")
    click.echo(f"{path}: {'exists' if existed else 'created'}, active key {store.keyring.active_id}")


@keys.command("init")
@_config_option
def keys_init(config: str) -> None:
    """Create the key file and every secret engines would create on first use (multi-host: run
    once, then copy or mount that one file on every host before starting them)."""
    from engine.cli.keys_init import SECRETS, init_key_file

    settings = _load(config, need_env=False)
    path = settings.resolve(settings.keys.kek_file)
    existed, ring, created = init_key_file(path)
    click.echo(f"{path}: {'exists' if existed else 'created'}, active key {ring.active_id}; secrets "
               f"{', '.join(SECRETS)}: {', '.join(created) + ' created' if created else 'all present'}")


@keys.command("rotate")
@_config_option
@click.option("--retire/--keep-old", default=True, show_default=True,
              help="remove old KEKs once nothing uses them")
def keys_rotate(config: str, retire: bool) -> None:
    """Add a new KEK and re-wrap every data key under it, in batches, while the engine runs.

    Ciphertexts are not touched; a crash mid-way leaves each blob wrapped by either
    the old or the new key, both still in the key file, so nothing is lost; run again.
    """
    from tqdm import tqdm

    from engine.audit.trail import Audit
    from engine.store.key_rotation import rotate

    store = _open_store(config)
    with tqdm(unit="key", desc="re-wrap", file=sys.stderr) as bar:
        new, n, retired = rotate(store, retire=retire, progress=bar.update)
    Audit(store).record("keys.rotate", actor=os.environ.get("USER", "cli"),
                        detail=f"new {new}, rewrapped {n}, retired {','.join(retired) or '-'}")
    click.echo(f"active key {new}; re-wrapped {n} data keys; retired {', '.join(retired) or 'none'}")


# -- import -----------------------------------------------------------------
@main.command("import")
@_config_option
@click.option("--channel", required=True, help="channel to load into (its source decides the protocol)")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--host", default=None, help="engine address (default: the source's host, 127.0.0.1 for 0.0.0.0)")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="engine port (default: the source's port)")
@click.option("--calling-aet", "--aet", "aet", default=None,
              help="DICOM: our calling AE title (default MEDRELAY-IMPORT; must be in the channel's calling_aets)")
@click.option("--token-env", default="MEDRELAY_API_TOKEN", show_default=True,
              help="FHIR: environment variable holding the bearer token (default when unset: the "
                   "channel's own first bearer token, e.g. its ${generated:...} file)")
def import_cmd(config: str, channel: str, paths: tuple[str, ...], host: str | None, port: int | None,
               aet: str | None, token_env: str) -> None:
    """Load DICOM, HL7 v2 or FHIR files into a RUNNING engine through the channel's own protocol.

    Each file gets the same checks, de-duplication, routes and audit as live traffic, and
    its own answer; a progress bar shows the count. Files the channel's protocol does not
    carry are skipped. Every rejected or skipped file is named with the reason, then one
    line counts accepted, rejected and skipped.

    Exit 0 when every file was accepted, 1 when some were rejected or skipped, 2 for a
    channel that cannot be imported into as asked (unknown, TLS, a calling AE title it
    refuses), 4 when the engine cannot be reached.
    """
    from tqdm import tqdm

    from engine.cli import bulk_import as bi
    settings = _load(config, need_env=False)
    if channel not in settings.channels:
        click.echo(f"no channel {channel!r} in {config} (channels: {', '.join(settings.channels) or 'none'})",
                   err=True)
        sys.exit(2)
    src = settings.channels[channel].source
    if src.type not in ("mllp", "dicom", "fhir"):
        click.echo(f"cannot import into channel {channel!r}: its source is {src.type}, not mllp, dicom or fhir",
                   err=True)
        sys.exit(2)
    if getattr(src, "tls", None) is not None:
        click.echo(f"import does not speak TLS yet, and channel {channel!r} has tls: run it against a "
                   "plain-TCP channel", err=True)
        sys.exit(2)
    h = host or (getattr(src, "host", "127.0.0.1") if getattr(src, "host", "") not in ("", "0.0.0.0") else "127.0.0.1")
    p = port or src.port
    calling = None
    if src.type == "dicom":
        try:
            calling = bi.choose_calling_aet(src, aet)
        except bi.UsageProblem as e:
            click.echo(f"channel {channel}: {e}", err=True)
            sys.exit(2)
    files = bi.expand(paths)
    with tqdm(total=len(files) if src.type != "mllp" else None, unit="file" if src.type != "mllp" else "msg",
              desc=f"import {channel}", file=sys.stderr) as bar:
        report = bi.Report(progress=bar.update)
        try:
            if src.type == "mllp":
                bi.import_hl7(h, p, files, report)
            elif src.type == "dicom":
                bi.import_dicom(h, p, src.ae_title, calling or bi.IMPORT_AET, files, report)
            else:
                token = os.environ.get(token_env) or _channel_token(src)
                bi.import_fhir(f"http://{h}:{p}{src.base_path}", token, files, report)
            failure = None
        except bi.ImportFailed as e:
            failure = str(e)
    for line in report.problems():
        click.echo(line)
    click.echo(report.summary())
    if failure:
        click.echo(f"import stopped: {failure}", err=True)
        sys.exit(4)
    sys.exit(0 if report.all_accepted else 1)


def _channel_token(source: Any) -> str | None:
    """The FHIR channel's first bearer token when the config holds it readably (a file, a set variable)."""
    auth = getattr(source, "auth", None)
    for t in getattr(auth, "bearer_tokens", None) or []:
        if t and not t.startswith("<"):  # "<unset:VAR>", "<generated-on-first-run>", ... placeholders
            return str(t)
    return None


# -- store ----------------------------------------------------------------
@main.group()
def store() -> None:
    """Maintenance of the message store."""


@store.command("gc")
@_config_option
@click.option("--older-than", default=3600.0, show_default=True, type=click.FloatRange(min=0),
              help="seconds (>= 0); younger files may belong to a commit still in flight")
@click.option("--dry-run", is_flag=True, help="only count what would be removed")
def store_gc(config: str, older_than: float, dry_run: bool) -> None:
    """Remove encrypted blob files that no stored message refers to (left by a crash mid-commit)."""
    from engine.audit.trail import Audit
    from engine.store.gc import collect
    from engine.store.leases import LeaseHeld

    st = _open_store(config)
    try:
        n, size = collect(st, older_than=older_than, dry_run=dry_run)
    except LeaseHeld as e:
        raise click.ClickException(f"another store gc is running ({e})") from None
    if not dry_run:
        Audit(st).record("store.gc", actor=os.environ.get("USER", "cli"), detail=f"{n} orphan files removed")
    click.echo(f"{'would remove' if dry_run else 'removed'} {n} orphan blob files ({size} bytes)")


# -- map (dry run) ----------------------------------------------------------
@main.command("map")
@_config_option
@click.option("--route", "route_name", required=True,
              help="the route to run: NAME, or CHANNEL/NAME when several channels have one of that name")
@click.option("--diff/--no-diff", default=True, show_default=True,
              help="print a unified diff against the input (--no-diff: the output itself)")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def map_cmd(config: str, route_name: str, diff: bool, file: str) -> None:
    """Dry run: what a route's transforms make of the message in FILE (HL7 v2, DICOM or FHIR JSON).

    Nothing is stored or sent: the transforms run against a scratch store and key file,
    as in `medrelay test` (so regenerated UIDs and pseudonyms differ from the engine's).
    Says whether the route's `when:` takes the message, then shows the diff. Exit 0 when
    the message comes out, 1 when the route does not take it or a step filters it, 2 when
    a transform fails (what would be a dead letter).
    """
    import difflib
    import tempfile

    from engine import registry
    from engine.audit.trail import Audit
    from engine.config import source_kind
    from engine.context import ComponentContext
    from engine.envelope import Drop, Envelope
    from engine.match import matches
    from engine.pipeline import apply_transforms
    from engine.security.crypto import KeyRing
    from engine.store.db import Store

    mlog.configure("error", "auto")  # the scratch store's "new key file" warning is not news here
    settings = _load(config)
    want_channel, _, want_route = route_name.rpartition("/")
    found = [(c, r) for c, ch in settings.channels.items() for r in ch.routes
             if r.name == want_route and (not want_channel or c == want_channel)]
    if len(found) != 1:
        click.echo(f"{'no' if not found else 'more than one'} route {route_name!r} in {config}"
                   + (" (say CHANNEL/NAME)" if found else ""), err=True)
        sys.exit(2)
    cname, route = found[0]
    kind = source_kind(settings.channels[cname].source) or "hl7v2"
    payload = Path(file).read_bytes()
    env = Envelope(channel=cname, kind=kind, payload=payload, headers=_map_headers(kind, payload))  # type: ignore[arg-type]
    routed = matches(dict(route.when), env)
    click.echo(f"route {cname}/{route.name}: when: {'takes' if routed else 'does not take'} this message")
    if not routed:
        sys.exit(1)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Store(f"sqlite:///{tmp}/scratch.db", Path(tmp) / "blobs", KeyRing(Path(tmp) / "keys.json"))
        scratch.migrate()
        ctx = ComponentContext(settings=settings, store=scratch, keyring=scratch.keyring, audit=Audit(scratch),
                               channel=cname, route=route.name)
        try:
            steps = [registry.get("transform", t.type).factory(t, ctx) for t in route.transforms]
            outs = apply_transforms(steps, env)
        except Drop as d:
            click.echo(f"filtered: {d.reason}")
            sys.exit(1)
        except Exception as e:
            click.echo(f"transform failed (a dead letter): {type(e).__name__}: {e}", err=True)
            sys.exit(2)
        finally:
            scratch.dispose()
    before = _map_render(kind, payload)
    for n, out in enumerate(outs, 1):
        after = _map_render(out.kind, out.payload)
        label = f"{file} -> {route.name}" + (f" [{n}/{len(outs)}]" if len(outs) > 1 else "")
        if not diff or out.kind != kind:
            click.echo(f"--- {label} ({out.kind})")
            click.echo("\n".join(after))
            continue
        lines = list(difflib.unified_diff(before, after, fromfile=file, tofile=label, lineterm=""))
        click.echo("\n".join(lines) if lines else f"{label}: no change")


def _map_headers(kind: str, payload: bytes) -> dict[str, Any]:
    """The envelope headers a listener would set, so `when:` on headers answers as in production."""
    try:
        if kind == "hl7v2":
            from engine.hl7.message import read_header

            return read_header(payload, require=False).as_headers()
        if kind == "fhir":
            return {"resourceType": str(json.loads(payload).get("resourceType", ""))}
        if kind == "dicom":
            from io import BytesIO

            from pydicom import dcmread

            ds = dcmread(BytesIO(payload), force=True, stop_before_pixels=True)
            return {k: str(ds.get(k)) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                                 "SeriesInstanceUID", "Modality") if k in ds}
    except Exception:
        return {}
    return {}


def _map_render(kind: str, payload: bytes) -> list[str]:
    """Lines to diff: HL7 a segment a line, FHIR pretty JSON, DICOM the data set dump without pixels."""
    from engine.messages import render_lines

    return render_lines(kind, payload)


# -- components -------------------------------------------------------------
@main.command()
@click.option("--markdown", is_flag=True, help="print as Markdown (docs/components.md)")
def components(markdown: bool) -> None:
    """Document every source, transform and destination from its config model."""
    from engine.cli.docs import components_markdown

    click.echo(components_markdown() if markdown else components_markdown(plain=True))


# -- test -------------------------------------------------------------------
@main.command("test")
@click.argument("config_arg", metavar="[CONFIG]", required=False)
@click.option("-c", "--config", "config_opt", default=None, help=CONFIG_HELP + "; or as the argument")
@click.option("--cases", "cases_dir", default=None, type=click.Path(file_okay=False),
              help="folder of cases (default: channel-tests/ beside CONFIG)")
@click.option("--update", is_flag=True, help="rewrite the expected file of every case whose output changed")
def test_cmd(config_arg: str | None, cases_dir: str | None, update: bool, config_opt: str | None = None) -> None:
    """Run the route cases kept beside the YAML (channel-tests/): input -> expected output, no network.

    A case is a folder in channel-tests/ with `case.yaml` ({channel, route, input,
    expect}) naming files in the same folder. A mismatch prints a diff; --update rewrites
    the expected files that differ instead (and names them). Exit 0 when all pass, 1 when
    one fails or there is no case.
    """
    from engine.cli.casetest import run_cases

    if config_arg and config_opt and config_arg != config_opt:
        raise click.UsageError(f"two configs: {config_arg} and -c {config_opt}; give one")
    config = config_arg or config_opt or os.environ.get("MEDRELAY_CONFIG", "channels.yaml")
    settings = _load(config)
    folder = Path(cases_dir) if cases_dir else settings.base_dir / "channel-tests"
    if not folder.is_dir() or not any(folder.glob("*/case.yaml")):
        click.echo(f"no cases in {folder}: each case is a folder there with a case.yaml", err=True)
        sys.exit(1)
    results = run_cases(settings, folder, update=update)
    failed = updated = 0
    for r in results:
        if r.updated:
            click.echo(f"UPDATED {r.name}: {r.detail}")
        else:
            click.echo(f"{'PASS' if r.ok else 'FAIL'} {r.name}" + ("" if r.ok else f": {r.detail}"))
        failed += not r.ok
        updated += r.updated
    tail = f", {updated} updated" if update else ""
    click.echo(f"{len(results) - failed - updated} passed, {failed} failed{tail}")
    sys.exit(1 if failed or not results else 0)


if __name__ == "__main__":
    main()
