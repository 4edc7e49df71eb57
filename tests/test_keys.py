"""Key management: atomic key file, rotation under load, kill -9 mid-rotation.

Tampering and swapped blobs are covered in test_engine_store.py; here we prove the
operational promises of `medrelay keys rotate`: no downtime, nothing lost on a crash,
old KEKs gone once nothing needs them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import engine_fakes
import pytest
from sqlalchemy import func, select

from engine.envelope import Envelope
from engine.security.crypto import KeyRing
from engine.store import key_rotation as keymod
from engine.store import schema
from engine.store.db import Store

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def cli_env() -> dict[str, str]:
    return {**os.environ, "MEDRELAY_PLUGINS": "engine_fakes",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])}


def all_blobs_decrypt(store: Store) -> int:
    """Open every blob with a fresh key ring (as a restarted engine would); returns the count."""
    fresh = Store(str(store.url.render_as_string(hide_password=False)), store.blob_dir,
                  KeyRing(store.keyring.path), inline_max=store.inline_max)
    n = 0
    try:
        with fresh.engine.connect() as c:
            for bid, aad in c.execute(select(schema.blobs.c.id, schema.blobs.c.aad)).all():
                fresh.get_blob(c, bid, aad=aad)
                n += 1
    finally:
        fresh.dispose()
    return n


def key_file(path: Path) -> dict:
    return json.loads(path.read_text())


# -- the key file ------------------------------------------------------------------
def test_key_file_write_is_atomic_and_durable(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    ring = KeyRing(path)
    before = path.read_bytes()
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))

    def crash(*_a, **_k):
        raise OSError("power cut before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ring.add_kek()
    assert path.read_bytes() == before  # the old file is whole; the new one never half-written
    assert len(KeyRing(path).kek_ids()) == 1
    monkeypatch.undo()
    synced.clear()
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    ring2 = KeyRing(path)
    ring2.add_kek()
    assert len(synced) >= 2  # the temporary file's data, then the folder entry after the rename
    assert path.stat().st_mode & 0o777 == 0o600
    assert not path.with_name("keys.json.tmp").exists()


def test_two_processes_never_lose_each_others_changes(tmp_path):
    """The engine creating a pseudonym secret while the CLI rotates: both changes survive."""
    path = tmp_path / "keys.json"
    engine_ring, cli_ring = KeyRing(path), KeyRing(path)
    new = cli_ring.add_kek()
    secret = engine_ring.hmac_key("pseudonyms")  # written by a ring that has not seen `new`
    on_disk = KeyRing(path)
    assert new in on_disk.kek_ids() and on_disk.active_id == new
    assert on_disk.hmac_key("pseudonyms") == secret
    assert cli_ring.hmac_key("pseudonyms") == secret  # the CLI picks up the engine's secret


def test_running_engine_follows_rotation_by_another_process(store, tmp_path):
    """The engine's ring reads data keys re-wrapped under a KEK it has never seen,
    then seals new blobs under it; retired KEKs stay usable in its memory for what is in flight."""
    with store.engine.begin() as c:
        ids = store.put_blobs(c, [(f"before {i}".encode(), f"m{i}") for i in range(20)])
    old = store.keyring.active_id
    other = Store(str(store.url.render_as_string(hide_password=False)), store.blob_dir,
                  KeyRing(store.keyring.path), inline_max=1024)
    try:
        new, n, retired = keymod.rotate(other)
    finally:
        other.dispose()
    assert n == 20 and retired == [old]
    with store.engine.connect() as c:  # the engine's ring still has only `old` loaded
        assert store.get_blob(c, ids[3], aad="m3") == b"before 3"
    assert store.keyring.active_id == new
    with store.engine.begin() as c:
        store.put_blob(c, b"after", "m-after")
    assert keymod.key_usage(store) == {new: 21}
    assert all_blobs_decrypt(store) == 21


def test_blob_sealed_before_retirement_is_rewrapped_by_the_engine(store):
    """The race the fence closes: sealed under the old KEK, committed after it was retired."""
    old = store.keyring.active_id
    other = Store(str(store.url.render_as_string(hide_password=False)), store.blob_dir,
                  KeyRing(store.keyring.path), inline_max=1024)
    try:
        new = other.keyring.add_kek()
        retired, busy = keymod.retire_unused(other)
    finally:
        other.dispose()
    assert retired == [old] and not busy and old not in KeyRing(store.keyring.path).kek_ids()
    sealed = store.keyring.seal(b"in flight", "m-x")  # what a stale engine would do...
    assert sealed.kek_id == old
    with store.engine.begin() as c:  # ...and put_blobs seals the same way, then fences
        bid = store.put_blob(c, b"in flight", "m-x")
    with store.engine.connect() as c:
        kid = c.execute(select(schema.blobs.c.kek_id).where(schema.blobs.c.id == bid)).scalar_one()
    assert kid == new
    assert all_blobs_decrypt(store) == 1


# -- rotation while the engine accepts and delivers ------------------------------------
ENGINE_YAML = engine_fakes.collect_yaml(max_attempts=50, max_delay=0.2)


def test_rotate_without_downtime(engine_factory, store_url):
    name = f"rot-{random.randrange(1 << 30)}"
    engine_fakes.OUTBOX.pop(name, None)
    eng = engine_factory(ENGINE_YAML.format(url=store_url, name=name))
    store = eng.store
    with store.engine.begin() as c:  # enough data keys that the re-wrap takes a while
        store.put_blobs(c, [(f"old payload {i}".encode(), f"seed{i}") for i in range(6000)])
    first = store.keyring.active_id
    outcomes: list[str] = []
    stop = threading.Event()

    def feed() -> None:
        i = 0
        while not stop.is_set():
            env = Envelope(channel="in", kind="hl7v2", payload=f"MSG {i}".encode(), headers={})
            outcomes.append(eng.call(eng.runtime.intake.submit(env)).status)
            i += 1
            time.sleep(0.002)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        time.sleep(0.3)
        r = cli("keys", "rotate", "-c", str(eng.config_path), cwd=eng.data_dir)
        time.sleep(0.3)
    finally:
        stop.set()
        feeder.join(30)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "retired " + first in r.stdout, r.stdout
    assert outcomes and set(outcomes) == {"accepted"}, set(outcomes)
    sent = len(outcomes)
    eng.wait_for(lambda: len(engine_fakes.OUTBOX.get(name, [])) == sent, timeout=60)
    d = schema.deliveries

    def states():  # a batch is marked done just after its last send: wait for the mark too
        with store.engine.connect() as c:
            return dict(c.execute(select(d.c.state, func.count()).group_by(d.c.state)).all())

    eng.wait_for(lambda: states() == {"done": sent}, timeout=30)
    ring_ids = KeyRing(store.keyring.path).kek_ids()
    assert first not in ring_ids and len(ring_ids) == 1
    eng.stop()
    assert all_blobs_decrypt(store) == 6000 + sent
    assert set(keymod.key_usage(store)) == set(ring_ids)
    with store.engine.connect() as c:
        rows = c.execute(select(schema.audit_events.c.detail)
                         .where(schema.audit_events.c.action == "keys.rotate")).scalars().all()
    assert rows and first in rows[-1]


# -- kill -9 in the middle of a rotation ---------------------------------------------
N_BLOBS = 20_000


@pytest.mark.slow  # 40-60 s at load 8 on 2 cores (20,000 blobs re-wrapped)
def test_kill9_mid_rotation_loses_nothing(tmp_path, store_url):
    data = tmp_path / "d"
    cfg = data / "channels.yaml"
    data.mkdir()
    cfg.write_text(textwrap.dedent(f"""
        store: {{url: "{store_url}", blobs: blobs}}
        keys: {{kek_file: keys.json}}
        channels: {{}}
    """))
    store = Store(store_url, data / "blobs", KeyRing(data / "keys.json"), inline_max=1024)
    store.migrate()
    try:
        with store.engine.begin() as c:
            for start in range(0, N_BLOBS, 2000):
                store.put_blobs(c, [(f"blob {i}".encode(), f"m{i}") for i in range(start, start + 2000)])
        original = store.keyring.active_id
        seed = random.randrange(1 << 30)
        rnd = random.Random(seed)
        target = rnd.uniform(0.05, 0.9)  # fraction re-wrapped when the kill lands
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "keys", "rotate", "-c", str(cfg)],
                                cwd=data, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        b = schema.blobs
        deadline = time.monotonic() + 120
        killed_at = None
        while time.monotonic() < deadline and proc.poll() is None:
            with store.engine.connect() as c:
                left = c.execute(select(func.count()).select_from(b).where(b.c.kek_id == original)).scalar_one()
            if left < N_BLOBS * (1 - target):
                proc.send_signal(signal.SIGKILL)
                killed_at = N_BLOBS - left
                break
            time.sleep(0.005)
        proc.wait(30)
        assert killed_at is not None, f"rotation finished before the kill (seed {seed}): {proc.stderr.read()!r}"
        assert proc.returncode == -signal.SIGKILL
        on_disk = KeyRing(data / "keys.json")
        assert original in on_disk.kek_ids() and len(on_disk.kek_ids()) == 2, f"seed {seed}"
        usage = keymod.key_usage(store)
        assert sum(usage.values()) == N_BLOBS and 0 < usage[original] < N_BLOBS, (seed, usage)
        assert all_blobs_decrypt(store) == N_BLOBS, f"seed {seed}"

        r = cli("keys", "rotate", "-c", str(cfg), cwd=data)  # run again to completion
        assert r.returncode == 0, r.stderr[-2000:]
        final = KeyRing(data / "keys.json")
        assert len(final.kek_ids()) == 1 and original not in final.kek_ids()
        assert keymod.key_usage(store) == {final.active_id: N_BLOBS}
        assert all_blobs_decrypt(store) == N_BLOBS
        listing = cli("keys", "list", "-c", str(cfg), cwd=data)
        assert listing.stdout.strip() == f"* {final.active_id}  blobs={N_BLOBS}"
    finally:
        store.dispose()


# -- tampering in the running engine ---------------------------------------------------
TAMPER_YAML = engine_fakes.collect_yaml(max_attempts=5, initial_delay=1.0, max_delay=1.0,
                                        store_extra=", inline_max_bytes: 64")


@pytest.mark.parametrize("how", ["inline_data", "file", "wrapped_key", "nonce", "aad_column"])
def test_tampered_blob_is_dead_lettered_loudly_and_the_route_goes_on(engine_factory, store_url, how):
    """Tampering (or a swapped/torn blob) dead-letters that one delivery with an integrity error and a
    security audit event; the messages before and after it are delivered, nothing spins."""
    name = f"tamper-{how}-{random.randrange(1 << 30)}"
    engine_fakes.SCRIPT[name] = ["fail"]  # hold the head of the queue for a second while we tamper
    eng = engine_factory(TAMPER_YAML.format(url=store_url, name=name))
    big = how == "file"
    payloads = [b"first", (b"x" * 200 if big else b"second"), b"third"]
    ids = []
    for p in payloads:
        env = Envelope(channel="in", kind="hl7v2", payload=p, headers={})
        ids.append(eng.call(eng.runtime.intake.submit(env)).message_id)
    b, m = schema.blobs, schema.messages
    with eng.store.engine.begin() as c:
        bid = c.execute(select(m.c.blob_id).where(m.c.id == ids[1])).scalar_one()
        row = c.execute(select(b).where(b.c.id == bid)).mappings().one()
        flip = {"inline_data": "data", "wrapped_key": "wrapped_key", "nonce": "nonce"}.get(how)
        if flip:
            v = row[flip]
            c.execute(b.update().where(b.c.id == bid).values({flip: bytes([v[0] ^ 1]) + v[1:]}))
        elif how == "aad_column":  # rebind the row to another message: GCM must still refuse
            c.execute(b.update().where(b.c.id == bid).values(aad=ids[2]))
            c.execute(m.update().where(m.c.id == ids[1]).values(blob_id=bid))
    if how == "file":
        path = eng.store.blob_path(bid)
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    d = schema.deliveries

    def states():
        with eng.store.engine.connect() as c:
            return {r.message_id: (r.state, r.last_error) for r in c.execute(select(d))}

    eng.wait_for(lambda: all(s != "pending" for s, _ in states().values()), timeout=30)
    st = states()
    assert st[ids[0]][0] == "done" and st[ids[2]][0] == "done", st
    assert st[ids[1]][0] == "dead" and st[ids[1]][1].startswith("integrity:"), st
    assert engine_fakes.OUTBOX[name] == [payloads[0], payloads[2]]
    a = schema.audit_events
    with eng.store.engine.connect() as c:
        alerts = c.execute(select(a.c.message_id, a.c.outcome)
                           .where(a.c.action == "security.integrity_failure")).all()
    assert alerts == [(ids[1], "error")]


# -- medrelay keys init (issue 10: multi-host key files) --------------------------------------------
PATIENT_MSG = (b"MSH|^~\\&|HIS|HOSP|RIS|RAD|20240102030405||ADT^A01|KEYS-INIT-1|P|2.5\r"
               b"PID|1||MRN-77^^^HOSP^MR||DOE^JANE||19800101|F\r")


def _host_yaml(url: str, key_file: Path, name: str) -> str:
    text = engine_fakes.collect_yaml(max_attempts=1).format(name=name, url=url)
    return text.replace("kek_file: data/keys.json", f'kek_file: "{key_file}"')


def test_keys_init_creates_every_secret_once(tmp_path):
    from engine.cli.keys_init import SECRETS

    cfg = tmp_path / "channels.yaml"
    cfg.write_text(_host_yaml(f"sqlite:///{tmp_path}/db.sqlite", tmp_path / "k" / "keys.json", "x"))
    r = cli("keys", "init", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "created, active key" in r.stdout and "created" in r.stdout.split(";")[1]
    first = key_file(tmp_path / "k" / "keys.json")
    assert set(first["secrets"]) == set(SECRETS)
    assert (tmp_path / "k" / "keys.json").stat().st_mode & 0o777 == 0o600
    r = cli("keys", "init", "-c", str(cfg), cwd=tmp_path)  # again: nothing changes
    assert r.returncode == 0 and "exists" in r.stdout and "all present" in r.stdout, r.stdout + r.stderr
    assert key_file(tmp_path / "k" / "keys.json") == first
    assert not (tmp_path / "db.sqlite").exists()  # the key file only: runs before any database exists


def test_keys_init_knows_every_secret_the_code_asks_for():
    """SECRETS must name every secret asked for by name anywhere (engine, listeners, routes, transforms)."""
    import re

    from engine.cli.keys_init import SECRETS
    from transforms.hl7_map import UID_KEY

    assert UID_KEY in SECRETS
    literal = re.compile(r"hmac_key\(\s*\"([^\"]+)\"")
    for folder in ("engine", "listeners", "routes", "transforms"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in literal.findall(path.read_text()):
                assert name in SECRETS, f"{path}: secret {name!r} is not pre-created by keys init"


@pytest.mark.parametrize("init", [True, False], ids=["keys-init", "fresh-file-copied"])
def test_hosts_with_a_copied_key_file_find_each_others_messages_after_keys_init(engine_factory, tmp_path, init):
    """Two engines on one PostgreSQL store, each with its own copy of the key file (two hosts). After
    `keys init` a message stored through one is found by patient id through the other. Copying a
    fresh file instead (what the docs said before) gives each host its own index secret: not found."""
    from conftest import fresh_pg_url

    from engine.envelope import Envelope
    from engine.hl7.message import read_header
    from engine.messages import MessageFilter, query_messages, show_message

    url = fresh_pg_url()
    key_a, key_b = tmp_path / "host-a" / "keys.json", tmp_path / "host-b" / "keys.json"
    cfg = tmp_path / "a.yaml"
    cfg.write_text(_host_yaml(url, key_a, "host-a"))
    if init:
        r = cli("keys", "init", "-c", str(cfg), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    else:
        KeyRing(key_a)  # the file as a first engine start creates it: KEKs, no secrets yet
    key_b.parent.mkdir()
    key_b.write_bytes(key_a.read_bytes())
    os.chmod(key_b, 0o600)
    a = engine_factory(_host_yaml(url, key_a, "host-a"))
    b = engine_factory(_host_yaml(url, key_b, "host-b"))
    env = Envelope(channel="in", kind="hl7v2", payload=PATIENT_MSG, headers=read_header(PATIENT_MSG).as_headers())
    out = a.call(a.runtime.intake.submit(env))
    assert out.status == "accepted"
    found = [r["id"] for r in query_messages(b.store, MessageFilter(patient_id="MRN-77")).rows]
    assert found == ([out.message_id] if init else [])
    assert [r["id"] for r in query_messages(a.store, MessageFilter(patient_id="MRN-77")).rows] == [out.message_id]
    shown = show_message(b.store, out.message_id, with_payload=True)  # the KEK is shared either way
    assert shown is not None and "MRN-77" in str(shown.get("payload", ""))
