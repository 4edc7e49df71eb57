"""MLLP throughput: medrelay's full path next to a bare asyncio echo-ACK server.

    .venv/bin/python bench/mllp.py [--messages 3000] [--connections 8] [--profile prof.txt]

Cases: one connection sending ADT^A01 and waiting for each ACK, then N connections
in parallel. "medrelay" is `medrelay run` in a subprocess (MLLP listener -> header
read -> ACK built -> group commit on SQLite, synchronous=FULL -> ACK, then routed to
an MLLP receiver run by this bench in its own process). "echo" is a bare asyncio
server that answers each frame with an AA at once: the ceiling of Python + TCP on
this machine. The ratio is medrelay / echo; "forwarded" is the rate at which the
downstream received the messages (until the last one arrived).

--profile runs the engine under yappi (all threads, CPU clock) and writes the top
functions to the file; throughput with the profiler on is lower and is not reported.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.ports import free_port, wait_port  # noqa: E402

__all__ = ["free_port", "wait_port"]  # bench/scaleout.py uses them from here

SB, EB, CR = b"\x0b", b"\x1c", b"\r"


def adt(i: int, conn: int) -> bytes:
    cid = f"B{conn:02d}{i:07d}"
    return (f"MSH|^~\\&|HIS|HOSP|RIS|RAD|20240102030405||ADT^A01^ADT_A01|{cid}|P|2.5\r"
            f"EVN|A01|20240102030405\rPID|1||{100000 + i}^^^HOSP^MR||DOE^JOHN^Q||19800101|M|||"
            f"1 MAIN ST^^TOWN^ST^12345\rPV1|1|I|W^389^1^^^^^^WARD|||||1234^DOC^A|||||||||||{i}\r").encode()


# -- peers in their own processes (no GIL shared with the clients) -------------------------
def _frames(buf: bytearray) -> list[bytes]:
    out = []
    while True:
        s = buf.find(SB)
        e = buf.find(EB + CR, s + 1) if s >= 0 else -1
        if s < 0 or e < 0:
            return out
        out.append(bytes(buf[s + 1:e]))
        del buf[:e + 2]


def _ack(msg: bytes) -> bytes:
    msh = msg.split(CR, 1)[0].split(b"|")
    return (SB + b"MSH|^~\\&|RIS|RAD|" + msh[2] + b"|" + msh[3] + b"|20240101||ACK^A01^ACK|A" + msh[9]
            + b"|P|2.5\rMSA|AA|" + msh[9] + b"\r" + EB + CR)


def _serve(port: int, counter: mp.Value) -> None:  # type: ignore[valid-type]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        while data := await reader.read(65536):
            buf += data
            for m in _frames(buf):
                writer.write(_ack(m))
                with counter.get_lock():
                    counter.value += 1
            await writer.drain()
        writer.close()

    async def main() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", port)
        async with srv:
            await srv.serve_forever()

    asyncio.run(main())


def start_peer(port: int) -> tuple[mp.Process, mp.Value]:  # type: ignore[valid-type]
    counter = mp.Value("q", 0)
    p = mp.Process(target=_serve, args=(port, counter), daemon=True)
    p.start()
    wait_port(port)
    return p, counter


# -- clients ------------------------------------------------------------------------------
async def _client(port: int, conn: int, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    for i in range(count):
        writer.write(SB + adt(i, conn) + EB + CR)
        await writer.drain()
        while True:
            frames = _frames(buf)
            if frames:
                if b"MSA|AA|" not in frames[0] and b"MSA|CA|" not in frames[0]:
                    raise SystemExit(f"negative ACK: {frames[0][:200]!r}")
                break
            data = await reader.read(65536)
            if not data:
                raise SystemExit("connection closed by the server")
            buf += data
    writer.close()


async def _run_case(port: int, connections: int, total: int, tag: int) -> float:
    per = total // connections
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, tag * 100 + c, per) for c in range(connections)))
    return time.perf_counter() - t0


def run_case(port: int, connections: int, total: int, tag: int) -> tuple[int, float]:
    elapsed = asyncio.run(_run_case(port, connections, total, tag))
    n = (total // connections) * connections
    return n, elapsed


# -- medrelay --------------------------------------------------------------------------------
CONFIG = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
log: {{level: {level}}}
channels:
  adt:
    source: {{type: mllp, port: {port}}}
    routes:
      - name: ris
        to: {{type: mllp, host: 127.0.0.1, port: {rx}}}
"""

PROFILE_WRAPPER = """
import atexit, sys, yappi
OUT = sys.argv[1]
yappi.set_clock_type("cpu")
yappi.start(builtins=False)
def dump():
    yappi.stop()
    stats = yappi.get_func_stats()
    stats.sort("ttot")
    with open(OUT, "w") as f:
        f.write("yappi, CPU clock, all threads; sorted by total time (incl. callees)\\n")
        stats.print_all(out=f, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 8),
                                        3: ("ttot", 8), 4: ("tavg", 8)})
        f.write("\\n-- by own time --\\n")
        stats.sort("tsub")
        stats.print_all(out=f, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 8),
                                        3: ("ttot", 8), 4: ("tavg", 8)})
atexit.register(dump)
sys.argv = ["medrelay", "run", sys.argv[2]]
from engine.cli import main
main()
"""


def start_medrelay(workdir: Path, port: int, rx: int, level: str, profile: str | None) -> subprocess.Popen:
    cfg = workdir / "channels.yaml"
    cfg.write_text(textwrap.dedent(CONFIG.format(port=port, rx=rx, level=level)))
    log = open(workdir / "medrelay.log", "ab")
    if profile:
        cmd = [sys.executable, "-c", PROFILE_WRAPPER, str(Path(profile).resolve()), str(cfg)]
    else:
        cmd = [sys.executable, "-m", "engine.cli", "run", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=log, env=env)
    wait_port(port, proc=proc)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000, help="messages per case")
    ap.add_argument("--connections", type=int, default=8, help="parallel connections of the second case")
    ap.add_argument("--log-level", default="warning", choices=["debug", "info", "warning"],
                    help="medrelay's log level (info logs one line per message)")
    ap.add_argument("--profile", help="run medrelay under yappi and write the profile here")
    args = ap.parse_args()

    echo_port, rx_port, mr_port = free_port(), free_port(), free_port()
    echo, _ = start_peer(echo_port)
    rx, received = start_peer(rx_port)
    work = Path(tempfile.mkdtemp(prefix="medrelay-bench-"))
    mr = start_medrelay(work, mr_port, rx_port, args.log_level, args.profile)
    rows = []
    try:
        run_case(mr_port, 1, 200, tag=9)  # warm-up: connections, imports, SQLite pages
        run_case(echo_port, 1, 200, tag=9)
        deadline = time.monotonic() + 60
        while received.value < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        for conns in (1, args.connections):
            before = received.value
            n, t_echo = run_case(echo_port, conns, args.messages, tag=conns)
            t_start = time.perf_counter()
            n, t_mr = run_case(mr_port, conns, args.messages, tag=conns + 10)
            deadline = time.monotonic() + 120
            while received.value < before + n and time.monotonic() < deadline:
                time.sleep(0.01)
            t_fwd = time.perf_counter() - t_start
            rows.append((conns, n, n / t_echo, n / t_mr, n / t_fwd if received.value >= before + n else 0.0))
    finally:
        mr.terminate()
        try:
            mr.wait(300 if args.profile else 60)
        except subprocess.TimeoutExpired:
            mr.kill()
        echo.terminate()
        rx.terminate()

    print(f"MLLP ADT^A01, {args.messages} messages per case, SQLite synchronous=FULL, "
          f"medrelay log level {args.log_level}" + (" (PROFILED: rates not representative)" if args.profile else ""))
    print(f"{'connections':>11} {'messages':>8} {'echo msg/s':>11} {'medrelay ACKed msg/s':>21} "
          f"{'ratio':>6} {'forwarded msg/s':>16}")
    for conns, n, echo_rate, mr_rate, fwd in rows:
        print(f"{conns:>11} {n:>8} {echo_rate:>11.0f} {mr_rate:>21.0f} {mr_rate / echo_rate:>6.2f} {fwd:>16.0f}")
    if args.profile:
        print(f"profile written to {args.profile}")


if __name__ == "__main__":
    main()
