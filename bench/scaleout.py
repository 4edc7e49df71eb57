"""Scale-out: acknowledged MLLP msg/s with 1, 2 and 3 engines on one PostgreSQL database,
next to one engine on SQLite, measured in the same run (issue 10 item 2).

    .venv/bin/python bench/scaleout.py [--pg-url URL] [--messages 6000] [--connections 12]
                                       [--cases sqlite,pg1,pg2,pg3] [--rounds 1]

Each case starts N `medrelay run` processes (one blob folder and key file shared, as on one
host) whose MLLP listeners get the connections round-robin, as a TCP load balancer would
spread them. Every connection sends ADT messages and waits for each ACK; the route is
ordered and forwards to an MLLP receiver in its own process (delivery runs while intake is
measured, as in production). "ACKed msg/s" is messages / time until the last ACK;
"forwarded msg/s" is until the receiver has them all; "extra" is how many more the receiver
got than were sent (at-least-once resends; 0 without crashes).

PostgreSQL: ``--pg-url`` or MEDRELAY_BENCH_PG_URL (else MEDRELAY_TEST_PG_URL); its public
schema is dropped and recreated before each case. The machine's core count is printed with
the figures: with 2 cores, 3 engines + PostgreSQL + the clients share 2 CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mllp as base  # bench/mllp.py: the receiver, the client, ports

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
store: {{url: "{url}", blobs: "{shared}/blobs"}}
keys: {{kek_file: "{shared}/keys.json"}}
log: {{level: {level}}}
channels:
  adt:
    source: {{type: mllp, port: {port}}}
    routes:
      - name: ris
        to: {{type: mllp, host: 127.0.0.1, port: {rx}}}
"""


TICK = os.sysconf("SC_CLK_TCK")
LOG_LEVEL = os.environ.get("MEDRELAY_BENCH_LOG", "warning")  # the engines' log level


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process so far (all its threads), from /proc."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def pg_backends(url: str) -> list[int]:
    """PIDs of the PostgreSQL backends serving the engines (application_name medrelay)."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.connect() as c:
        pids = list(c.execute(text("SELECT pid FROM pg_stat_activity WHERE application_name = 'medrelay' "
                                   "AND datname = current_database()")).scalars())
    eng.dispose()
    return pids


def pg_commits(url: str) -> int:
    """Transactions committed in the database so far (all clients: the engines dominate during a case)."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.connect() as c:
        n = c.execute(text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")).scalar()
    eng.dispose()
    return int(n or 0)


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def reset_pg(url: str) -> None:
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE"))
        c.execute(text("CREATE SCHEMA public"))
    eng.dispose()


def start_engines(n: int, url: str, rx: int, work: Path) -> tuple[list[subprocess.Popen], list[int]]:
    from engine.security.crypto import KeyRing

    shared = work / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    KeyRing(shared / "keys.json")
    procs, ports = [], []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for i in range(n):
        d = work / f"e{i}"
        d.mkdir(parents=True, exist_ok=True)
        port = base.free_port()
        (d / "channels.yaml").write_text(textwrap.dedent(CONFIG.format(url=url, shared=shared, port=port, rx=rx,
                                                                       level=LOG_LEVEL)))
        log = open(d / "medrelay.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(d / "channels.yaml")],
                                      cwd=d, stdout=log, stderr=log, env=env))
        ports.append(port)
    for p, port in zip(procs, ports, strict=True):
        base.wait_port(port, timeout=90, proc=p)
    return procs, ports


async def _spread(ports: list[int], connections: int, per: int, tag: int) -> float:
    t0 = time.perf_counter()
    await asyncio.gather(*(base._client(ports[c % len(ports)], tag * 100 + c, per) for c in range(connections)))
    return time.perf_counter() - t0


def run_case(name: str, engines: int, url: str, args: argparse.Namespace, tag: int) -> dict[str, float]:
    rx_port = base.free_port()
    rx, received = base.start_peer(rx_port)
    work = Path(tempfile.mkdtemp(prefix=f"medrelay-scale-{name}-"))
    if url.startswith("sqlite"):
        url = f"sqlite:///{work / 'medrelay.db'}"
    else:
        reset_pg(url)
    procs, ports = start_engines(engines, url, rx_port, work)
    try:
        warm = 50 * len(ports)
        asyncio.run(_spread(ports, len(ports), 50, tag=90 + tag))  # connections, imports, caches
        deadline = time.monotonic() + 60
        while received.value < warm and time.monotonic() < deadline:
            time.sleep(0.05)
        per = args.messages // args.connections
        n = per * args.connections
        before = received.value
        backends = [] if url.startswith("sqlite") else pg_backends(url)
        engine_pids = [p.pid for p in procs]
        cpu0, pg0, m0 = cpu_seconds(engine_pids), cpu_seconds(backends), machine_busy()
        x0 = pg_commits(url) if backends else 0
        t_start = time.perf_counter()
        elapsed = asyncio.run(_spread(ports, args.connections, per, tag=tag))
        deadline = time.monotonic() + 180
        while received.value < before + n and time.monotonic() < deadline:
            time.sleep(0.01)
        t_fwd = time.perf_counter() - t_start
        cpu1, m1 = cpu_seconds(engine_pids), machine_busy()
        if backends:
            backends = sorted(set(backends) | set(pg_backends(url)))
        pg1 = cpu_seconds(backends)
        commits = (pg_commits(url) - x0) if backends else 0
        time.sleep(0.5)
        got = received.value - before
        engine_cpu = sum(cpu1.get(p, 0.0) - cpu0.get(p, 0.0) for p in engine_pids)
        pg_cpu = sum(pg1.get(p, 0.0) - pg0.get(p, 0.0) for p in backends)
        busy = (m1[0] - m0[0]) / max(m1[1] - m0[1], 1)
        return {"acked": n / elapsed, "forwarded": n / t_fwd if got >= n else 0.0, "extra": max(got - n, 0),
                "n": n, "engine_ms": 1000 * engine_cpu / n, "pg_ms": 1000 * pg_cpu / n, "busy": busy,
                "commits": commits / n}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        rx.terminate()


CASES = {"sqlite": ("1 x SQLite", 1), "pg1": ("1 x PostgreSQL", 1), "pg2": ("2 x PostgreSQL", 2),
         "pg3": ("3 x PostgreSQL", 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg-url", default=os.environ.get("MEDRELAY_BENCH_PG_URL")
                    or os.environ.get("MEDRELAY_TEST_PG_URL"))
    ap.add_argument("--messages", type=int, default=6000, help="messages per case")
    ap.add_argument("--connections", type=int, default=12, help="MLLP connections, spread over the engines")
    ap.add_argument("--cases", default="sqlite,pg1,pg2,pg3")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of all cases (the table shows the best)")
    args = ap.parse_args()
    if not args.pg_url:
        raise SystemExit("PostgreSQL URL needed: --pg-url or MEDRELAY_BENCH_PG_URL")
    results: dict[str, list[dict[str, float]]] = {}
    tag = 1
    for _ in range(args.rounds):
        for key in args.cases.split(","):
            name, engines = CASES[key]
            url = "sqlite" if key == "sqlite" else args.pg_url
            r = run_case(key, engines, url, args, tag)
            tag += 1
            results.setdefault(key, []).append(r)
            print(f"  {name}: {r['acked']:.0f} ACKed msg/s, {r['forwarded']:.0f} forwarded msg/s", flush=True)
    load = os.getloadavg()
    print(f"\nMLLP ADT, ordered route to an MLLP receiver, {args.connections} connections spread over the "
          f"engines, {args.messages} messages per case, best of {args.rounds}; {os.cpu_count()} cores, "
          f"load average {load[0]:.1f} at the end")
    print(f"{'setup':<16} {'ACKed msg/s':>12} {'vs SQLite':>10} {'forwarded msg/s':>16} {'extra':>6} "
          f"{'engine CPU ms/msg':>18} {'PG backend ms/msg':>18} {'PG commits/msg':>15} {'machine busy':>13}")
    sqlite = max((r["acked"] for r in results.get("sqlite", [])), default=0.0)
    for key in args.cases.split(","):
        best = max(results[key], key=lambda r: r["acked"])
        ratio = f"{best['acked'] / sqlite:.2f}" if sqlite else "-"
        print(f"{CASES[key][0]:<16} {best['acked']:>12.0f} {ratio:>10} {best['forwarded']:>16.0f} "
              f"{int(best['extra']):>6} {best['engine_ms']:>18.2f} {best['pg_ms']:>18.2f} {best['commits']:>15.2f} "
              f"{best['busy']:>12.0%}")


if __name__ == "__main__":
    main()
