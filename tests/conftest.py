"""Shared fixtures: a real engine in a background thread, or `medrelay run` as a process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
from ports import free_port as free_port  # re-exported: tests import it from here
from ports import wait_port

import engine.dimse  # noqa: F401  # pynetdicom's reactor race fixed for the tests' own SCUs too (engine/dimse/reactor.py)
from engine.config import parse_settings
from engine.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` passes.

    Wait for the very condition a test asserts next, never for a neighbour of it: on a
    loaded machine the two part by more than any fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def stored_control_ids(db: Path) -> list[str]:
    """MSH-10 of each message in a SQLite store file, read-only, while an engine writes it or after
    it was killed; [] while the file or its tables do not exist yet."""
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return []
    try:
        return [json.loads(h)["MSH-10"] for (h,) in c.execute("SELECT headers FROM messages")]
    except sqlite3.OperationalError:
        return []
    finally:
        c.close()


def delivered_files(folder: Path) -> list[Path]:
    """The files a file destination has finished in ``folder``, sorted. Its temporary
    ``.<name>.tmp`` (written, fsynced, then renamed) is left out: counting or reading it raced
    the write (pathlib's ``*`` and ``iterdir`` both include dot files)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def need_tool(path: str) -> str:
    """A peer tool the test needs: fail under CI when missing, skip only on a dev box."""
    if Path(path).exists() or shutil.which(path):
        return path
    if IN_CI:
        pytest.fail(f"{path} is required (CI installs it): missing peer")
    pytest.skip(f"{path} not installed")


class EngineThread:
    """A Runtime on its own event loop in a thread, so tests can drive it with blocking peers."""

    def __init__(self, yaml_text: str, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.config_path = data_dir / "channels.yaml"
        self.config_path.write_text(textwrap.dedent(yaml_text))
        full_env = {**os.environ, **(env or {})}
        self.settings = parse_settings(self.config_path.read_text(), self.config_path, env=full_env)
        self.runtime = Runtime(self.settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.runtime.start())

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def address(self, channel: str) -> tuple[str, int]:
        return self.runtime.listener(channel).address

    @property
    def store(self):
        return self.runtime.store

    def stop(self) -> None:
        if self.loop.is_running():
            try:
                self.call(self.runtime.stop())
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()  # else the collector closes it later, inside whichever test runs then

    def wait_for(self, predicate, timeout: float = 30.0, interval: float = 0.05):
        return wait_until(predicate, timeout, interval)


def _children() -> dict[int, str]:
    """This process's live child processes (pid: command line), from /proc."""
    me, out = str(os.getpid()), {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[1] == me and fields[0] not in ("Z", "X"):
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        except (OSError, IndexError):
            continue
    return out


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """A peer process a test started and did not stop (a failure before its ``finally``, a
    forgotten stop) goes with the test: left running it loads the machine under the next tests
    and holds its ports. Each one is killed and named in a warning, to be fixed where it starts."""
    before = set(_children())
    yield
    leftover = {pid: cmd for pid, cmd in _children().items() if pid not in before}
    if not leftover:
        return
    deadline = time.monotonic() + 5  # one being stopped right now (terminate, then wait) may end alone
    while leftover and time.monotonic() < deadline:
        time.sleep(0.1)
        leftover = {pid: cmd for pid, cmd in _children().items() if pid in leftover}
    for pid in leftover:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if leftover:
        warnings.warn(f"test left processes running (killed): {sorted(leftover.values())}", stacklevel=1)


@pytest.fixture(autouse=True)
def _fresh_fakes():
    """engine_fakes' OUTBOX and SCRIPT are module globals: each test starts with both empty. A
    parametrized test's second run saw the first run's deliveries (a wait for ">= 20" passed at
    once), and a test's unconsumed script steps went to the next test using the same name."""
    for name in ("engine_fakes", "tests.engine_fakes"):
        fakes = sys.modules.get(name)
        if fakes is not None:
            fakes.OUTBOX.clear()
            fakes.SCRIPT.clear()


@pytest.fixture
def engine_factory(tmp_path):
    started: list[EngineThread] = []

    def make(yaml_text: str, env: dict[str, str] | None = None, subdir: str = "e") -> EngineThread:
        d = tmp_path / f"{subdir}{len(started)}"
        d.mkdir()
        e = EngineThread(yaml_text, d, env)
        started.append(e)
        return e

    yield make
    for e in started:
        e.stop()


class MedrelayProc:
    """`medrelay run` in a subprocess: for kill -9 and signal tests."""

    def __init__(self, yaml_text: str, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.config_path = data_dir / "channels.yaml"
        self.config_path.write_text(textwrap.dedent(yaml_text))
        self.env = {**os.environ, **(env or {})}
        self.log_path = data_dir / "medrelay.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(self.config_path)],
                                     cwd=self.data_dir, env=self.env, stdout=self._log, stderr=self._log)

    def wait_port(self, port: int, timeout: float = 30.0) -> None:
        try:
            wait_port(port, timeout, self.proc)
        except AssertionError as e:
            raise AssertionError(f"medrelay: {e}; log: {self.log_path.read_text()[-3000:]}") from None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=self.data_dir, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def medrelay_proc(tmp_path):
    procs: list[MedrelayProc] = []

    def make(yaml_text: str, env: dict[str, str] | None = None) -> MedrelayProc:
        d = tmp_path / f"proc{len(procs)}"
        d.mkdir()
        p = MedrelayProc(yaml_text, d, env)
        procs.append(p)
        return p

    yield make
    for p in procs:
        try:
            p.terminate(10)
        except Exception:
            p.kill9()


def _reset_pg(url: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))
    eng.dispose()


@pytest.fixture
def store(tmp_path, store_url):
    """A migrated store on each backend; blobs above 1 KiB go to files, so small tests exercise both."""
    from engine.security.crypto import KeyRing
    from engine.store.db import Store

    s = Store(store_url, tmp_path / "blobs", KeyRing(tmp_path / "keys.json"), inline_max=1024)
    s.migrate()
    yield s
    s.dispose()


@pytest.fixture
def sqlite_store(tmp_path):
    """A migrated SQLite store with the default settings, for tests about what sits on top of it."""
    from engine.security.crypto import KeyRing
    from engine.store.db import Store

    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "blobs", KeyRing(tmp_path / "keys.json"))
    s.migrate()
    yield s
    s.dispose()


def fresh_pg_url() -> str:
    """MEDRELAY_TEST_PG_URL with an empty schema; a skip on a dev box without it, a failure under CI."""
    url = os.environ.get("MEDRELAY_TEST_PG_URL")
    if not url:
        if IN_CI:
            pytest.fail("MEDRELAY_TEST_PG_URL not set: PostgreSQL is required under CI")
        pytest.skip("PostgreSQL not available (run scripts/test.sh)")
    _reset_pg(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """Each store test runs on SQLite and on PostgreSQL (MEDRELAY_TEST_PG_URL, set by scripts/test.sh)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return fresh_pg_url()
