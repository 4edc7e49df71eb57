"""DICOMweb throughput: medrelay's dicomweb source next to Orthanc with its DICOMweb plugin.

Both run at once and get the same N instances (copies of pydicom's CT_small.dcm with new
UIDs, 10 instances per study, one patient per study) by STOW-RS in batches of 50, then,
in --rounds slices of --seconds with the servers taking turns (so load from other work on
the machine falls on both alike; the median is kept): QIDO-RS study searches by PatientID
(one random patient per request) and WADO-RS instance retrievals (a random instance, ``transfer-syntax=*``: as stored,
so neither server transcodes), from 1 and from 4 clients (threads, keep-alive
connections). Orthanc (Debian packages orthanc, orthanc-dicomweb) listens on every
interface and has no bind option, so the whole bench re-runs itself inside a network
namespace of its own (``unshare -n``, loopback up): both servers and the clients
talk over that namespace's loopback only. medrelay: `medrelay run`, SQLite (WAL,
synchronous FULL), encrypted blobs, bearer auth, an audit row per request, no routes (STOW-RS
indexes at intake; an archive route would still be marking instances archived in the
background while the reads are timed); Orthanc:
SQLite index, SyncStorageArea true, no authentication (its default on loopback).

    .venv/bin/python bench/dicomweb.py [--counts 1000,10000] [--seconds 4] [--rounds 3]

Prints each server's rates, the server's CPU milliseconds per request (/proc: what the
request costs the server, apart from the load generator sharing the machine) and the
medrelay / Orthanc ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from netns import in_namespace  # bench/netns.py (this script runs from bench/)
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-dicomweb-token-0123456789"
ORTHANC = "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PER_STUDY = 10
BATCH = 50
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def make_instances(n: int) -> list[tuple[str, str, str, str, bytes]]:
    """(patient id, study, series, sop, Part-10 bytes) for n instances."""
    base = dcmread(get_testdata_file("CT_small.dcm"))
    out = []
    for s in range((n + PER_STUDY - 1) // PER_STUDY):
        study, series = generate_uid(), generate_uid()
        pid = f"BENCH{s:06d}"
        for i in range(min(PER_STUDY, n - s * PER_STUDY)):
            ds = base.copy()
            ds.PatientID, ds.PatientName = pid, f"BENCH^PATIENT{s:06d}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            out.append((pid, study, series, ds.SOPInstanceUID, buf.getvalue()))
    return out


def wait_http(url: str, headers: dict[str, str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


class Medrelay:
    name = "medrelay"

    def __init__(self, work: Path, port: int) -> None:
        self.dir = work / "medrelay"
        self.dir.mkdir()
        (self.dir / "channels.yaml").write_text(textwrap.dedent(f"""
            store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
            keys: {{kek_file: data/keys.json}}
            log: {{level: warning}}
            channels:
              web:
                source: {{type: dicomweb, host: 127.0.0.1, port: {port}, base_path: /dicom-web,
                         auth: {{bearer_tokens: ["${{BENCH_TOKEN}}"]}}}}
                routes: []
            """))
        self.base = f"http://127.0.0.1:{port}/dicom-web"
        self.headers = {"Authorization": f"Bearer {TOKEN}"}
        self.log = open(self.dir / "medrelay.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", "channels.yaml"], cwd=self.dir,
                                     env={**os.environ, "BENCH_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(self.base + "/studies?limit=1", self.headers)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Orthanc:
    name = "Orthanc"

    def __init__(self, work: Path, port: int) -> None:
        self.dir = work / "orthanc"
        self.dir.mkdir()
        cfg = {"Name": "bench", "StorageDirectory": str(self.dir / "storage"),
               "IndexDirectory": str(self.dir / "index"),
               "HttpPort": port, "DicomPort": port + 1, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
               "SyncStorageArea": True, "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (self.dir / "orthanc.json").write_text(json.dumps(cfg))
        self.base = f"http://127.0.0.1:{port}/dicom-web"
        self.headers: dict[str, str] = {}
        self.log = open(self.dir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(self.dir / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_http(f"http://127.0.0.1:{port}/system", {})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def stow(server, instances) -> float:
    """Store every instance by STOW-RS in batches; returns instances per second."""
    boundary = "benchboundary0123456789"
    headers = {**server.headers, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    start = time.perf_counter()
    with httpx.Client(timeout=120) as c:
        for i in range(0, len(instances), BATCH):
            body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + inst[4] + b"\r\n"
                            for inst in instances[i:i + BATCH]) + f"--{boundary}--\r\n".encode()
            r = c.post(server.base + "/studies", content=body, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"{server.name} STOW answered {r.status_code}: {r.text[:200]}")
    return len(instances) / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rate(server, request, seconds: float, clients: int) -> tuple[float, float]:
    """Requests per second of ``request(client, rng)`` from ``clients`` threads for ``seconds``,
    and the server's CPU milliseconds per request."""
    counts = [0] * clients
    cpu0 = cpu_seconds(server.proc.pid)
    stop_at = time.perf_counter() + seconds

    def run(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(timeout=60, headers=server.headers) as c:
            while time.perf_counter() < stop_at:
                request(c, rng)
                counts[k] += 1

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = sum(counts)
    return done / (time.perf_counter() - start), (cpu_seconds(server.proc.pid) - cpu0) * 1000 / max(done, 1)


def requests_for(server, instances) -> dict[str, Callable[[httpx.Client, random.Random], None]]:
    pids = sorted({i[0] for i in instances})

    def qido(c: httpx.Client, rng: random.Random) -> None:
        r = c.get(server.base + "/studies", params={"PatientID": rng.choice(pids)},
                  headers={"Accept": "application/dicom+json"})
        assert r.status_code == 200 and len(r.json()) == 1, (server.name, r.status_code)

    def wado(c: httpx.Client, rng: random.Random) -> None:
        _pid, st, se, sop, _data = rng.choice(instances)
        r = c.get(f"{server.base}/studies/{st}/series/{se}/instances/{sop}", headers={"Accept": ACCEPT_DICOM})
        assert r.status_code == 200 and len(r.content) > 1000, (server.name, r.status_code)

    return {"qido": qido, "wado": wado}


def measure_both(servers: list[Any], instances: list[Any], seconds: float, rounds: int) -> dict[str, dict[str, float]]:
    """STOW into each, then each measurement in ``rounds`` slices of ``seconds``, the servers taking
    turns (A B A B ...): the load other work puts on the machine falls on both alike. The
    median of the rounds is kept (rates and CPU per request)."""
    out: dict[str, dict[str, float]] = {s.name: {"stow": stow(s, instances)} for s in servers}
    reqs = {s.name: requests_for(s, instances) for s in servers}
    for clients in (1, 4):
        for kind in ("qido", "wado"):
            got: dict[str, list[tuple[float, float]]] = {s.name: [] for s in servers}
            for k in range(rounds):
                for s in (servers if k % 2 == 0 else servers[::-1]):
                    got[s.name].append(rate(s, reqs[s.name][kind], seconds, clients))
            for name, results in got.items():
                out[name][f"{kind}{clients}"] = statistics.median(r for r, _c in results)
                out[name][f"{kind}{clients}_cpu"] = statistics.median(c for _r, c in results)
                print(f"  {name} {kind} x{clients}: " + ", ".join(f"{r:.0f}/s {c:.2f} ms" for r, c in results),
                      flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1000,10000")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of one measurement slice")
    ap.add_argument("--rounds", type=int, default=3, help="slices per server and measurement (median kept)")
    args = ap.parse_args()
    in_namespace("bench/dicomweb.py")
    rows = []
    for n in (int(x) for x in args.counts.split(",")):
        instances = make_instances(n)
        work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
        servers: list[Any] = []
        try:
            servers = [Medrelay(work, 18042), Orthanc(work, 18142)]
            got = measure_both(servers, instances, args.seconds, args.rounds)
        finally:
            for server in servers:
                server.stop()
            shutil.rmtree(work, ignore_errors=True)
        for name, g in got.items():
            rows.append((n, name, g))
            print(n, name, {k: round(v, 1) for k, v in g.items()}, flush=True)
    cols = ("stow", "qido1", "qido4", "wado1", "wado4")
    print("\n| instances | server | STOW-RS inst/s | QIDO studies/s (1 client) | QIDO (4) | "
          "WADO-RS instances/s (1 client) | WADO (4) | server CPU ms per QIDO / WADO (1 client) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    by = {(n, name): g for n, name, g in rows}
    for n in dict.fromkeys(n for n, _name, _g in rows):
        for name in ("medrelay", "Orthanc"):
            g = by.get((n, name))
            if g is not None:
                print(f"| {n:,} | {name} | " + " | ".join(f"{g[c]:.0f}" for c in cols)
                      + f" | {g['qido1_cpu']:.2f} / {g['wado1_cpu']:.2f} |")
        mine, theirs = by.get((n, "medrelay")), by.get((n, "Orthanc"))
        if mine and theirs:  # medrelay / Orthanc, same data, same run
            print(f"| {n:,} | ratio | " + " | ".join(f"{mine[c] / theirs[c]:.2f}x" for c in cols)
                  + f" | {mine['qido1_cpu'] / theirs['qido1_cpu']:.2f}x / "
                    f"{mine['wado1_cpu'] / theirs['wado1_cpu']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
