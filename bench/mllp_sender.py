"""CPU per message of the MLLP destination (routes/mllp.py), in process.

    python bench/mllp_sender.py [--messages 3000] [--rounds 5] [--compare OLD_ROUTES_MLLP.py]

An ACK peer runs in a child process (so its work is not in the figure); the sender sends
``--messages`` ADT messages one after the other on one connection, each envelope with the
headers the listener writes (``Header.as_headers``), and the figure is the CPU time of the
sending thread (``time.thread_time``: the event loop, the framing, the header and ACK reads),
not wall clock, divided by the messages. ``--compare`` loads another copy of routes/mllp.py
(for instance ``git show HEAD~1:routes/mllp.py > /tmp/old.py``) and alternates the two per
round, so a busy machine moves both alike. Also printed: the header part alone (the control
id of the message and the ACK check), per message, in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.envelope import Envelope
from engine.hl7.message import read_header

PEER = r"""
import asyncio, sys
async def handle(r, w):
    buf = b""
    while True:
        data = await r.read(65536)
        if not data:
            return
        buf += data
        while (e := buf.find(b"\x1c\r")) >= 0:
            msg, buf = buf[buf.find(b"\x0b") + 1:e], buf[e + 2:]
            cid = msg.split(b"\r", 1)[0].split(b"|")[9]
            w.write(b"\x0bMSH|^~\\&|RIS|RAD|HIS|HOSP|20240102030405||ACK^A01^ACK|A" + cid + b"|P|2.5\rMSA|AA|"
                    + cid + b"\r\x1c\r")
        await w.drain()
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(s.sockets[0].getsockname()[1], flush=True)
    await s.serve_forever()
asyncio.run(main())
"""


def adt(n: int) -> bytes:
    return (f"MSH|^~\\&|HIS|HOSP|RIS|RAD|20240102030405||ADT^A01^ADT_A01|B{n:08d}|P|2.5\r"
            f"EVN|A01|20240102030405\rPID|1||{n}^^^HOSP^MR||DOE^JOHN||19800101|M\rPV1|1|I|W^389^1\r").encode()


def envelopes(count: int) -> list[Envelope]:
    out = []
    for n in range(count):
        payload = adt(n)
        out.append(Envelope(channel="adt", kind="hl7v2", payload=payload,
                            headers=read_header(payload).as_headers()))
    return out


def load(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # pydantic resolves the config's annotations through it
    spec.loader.exec_module(mod)
    return mod


async def one_round(mod: ModuleType, port: int, envs: list[Envelope]) -> float:
    """CPU microseconds of this thread per message sent and acknowledged."""
    cfg = mod.MLLPDestinationConfig(type="mllp", host="127.0.0.1", port=port)
    sender = mod.MLLPSender(cfg)
    await sender.send(envs[0])  # connect outside the measurement
    t0 = time.thread_time()
    for env in envs:
        await sender.send(env)
    cpu = time.thread_time() - t0
    await sender.close()
    return cpu / len(envs) * 1e6


def header_part(mod: ModuleType, envs: list[Envelope]) -> float:
    """The control id and the ACK check alone, microseconds per message (no I/O)."""
    cfg = mod.MLLPDestinationConfig(type="mllp", host="127.0.0.1", port=1)
    sender = mod.MLLPSender(cfg)
    acks = []
    for env in envs:
        cid = env.headers["MSH-10"].encode()
        acks.append(b"MSH|^~\\&|RIS|RAD|HIS|HOSP|20240102030405||ACK^A01^ACK|A" + cid + b"|P|2.5\rMSA|AA|"
                    + cid + b"\r")
    control_id = getattr(mod, "control_id_of", None) or (lambda e: read_header(e.payload, require=False).control_id)
    t0 = time.thread_time()
    for env, ack in zip(envs, acks, strict=True):
        sender._check_ack(ack, control_id(env))
    return (time.thread_time() - t0) / len(envs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compare", help="another routes/mllp.py to alternate with this tree's")
    args = ap.parse_args()
    import routes.mllp

    mods: dict[str, ModuleType] = {"this tree": routes.mllp}
    if args.compare:
        mods["compare"] = load(args.compare, "mllp_compare")
    peer = subprocess.Popen([sys.executable, "-c", PEER], stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None
        port = int(peer.stdout.readline())
        envs = envelopes(args.messages)
        runs: dict[str, list[float]] = {k: [] for k in mods}
        parts: dict[str, list[float]] = {k: [] for k in mods}
        for r in range(args.rounds):
            for name, mod in mods.items():
                runs[name].append(asyncio.run(one_round(mod, port, envs)))
                parts[name].append(header_part(mod, envs))
            print(f"round {r + 1}: " + ", ".join(f"{k} {runs[k][-1]:.1f} us (header part {parts[k][-1]:.2f} us)"
                                               for k in mods), flush=True)
        for name in mods:
            print(f"{name}: median {statistics.median(runs[name]):.1f} us CPU per message, "
                  f"header part {statistics.median(parts[name]):.2f} us")
    finally:
        peer.terminate()
        peer.wait(10)


if __name__ == "__main__":
    main()
