"""Large instances retrieved from medrelay next to DCMTK's dcmqrscp serving the same file (issue 13 item 3).

    .venv/bin/python bench/large_retrieve.py --gib 1 [--gib 4]

For each size: one multi-frame instance is generated on disk (bench/large.py, written in
pieces), stored into `medrelay run` with storescu, and the engine is restarted, so the second
process's peak RSS is retrieval only. Then, against medrelay and against dcmqrscp (the same
file indexed with dcmqridx) in the same run:
- C-GET with getscu (+B: written straight to disk),
- C-MOVE with movescu to a DCMTK storescp (+B),
wall time of each getscu / movescu run (and of storescu -> storescp of the same file, the bare
DCMTK transfer, also for sizes dcmqrscp does not serve), each received data set checked
byte-identical to the file's (SHA-256), and medrelay's peak RSS per step (VmHWM, reset between steps through
/proc/<pid>/clear_refs) and its RSS after the step. The ratio is medrelay time / dcmqrscp time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import large  # noqa: E402  (bench/large.py: the instance writer and the DCMTK helpers)

ENV = {**os.environ, "TCP_NODELAY": "1"}
DCMQRSCP_STUDY_MAX = 1 << 30  # dcmqrscp caps maxBytesPerStudy at 1 GiB: larger files are not served
MIB = 1 << 20


def data_set_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(large.data_set_offset(path))
        while piece := f.read(8 * MIB):
            h.update(piece)
    return h.hexdigest()


def received_sha(folder: Path) -> str:
    """The data set hash of the one file a DCMTK receiver wrote (its own file meta, then the data set)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"{folder}: {len(files)} files received")
    sha = data_set_sha(files[0])
    for p in files:
        p.unlink()
    return sha


def getscu(port: int, aec: str, study: str, out: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/getscu", "-v", "-S", "+B", "-aet", "BENCH", "-aec", aec, "-od", str(out),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port)],
                       env=ENV, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0 or not any(out.iterdir()):
        raise RuntimeError(f"getscu {aec}: {(r.stdout + r.stderr)[-2000:]}")
    return time.perf_counter() - t


def movescu(port: int, aec: str, study: str) -> float:
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/movescu", "-v", "-S", "-aet", "BENCH", "-aec", aec, "-aem", "STORESCP",
                        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port)],
                       env=ENV, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0 or "Final Move Response (Success)" not in r.stdout + r.stderr:
        raise RuntimeError(f"movescu {aec}: {(r.stdout + r.stderr)[-2000:]}")
    return time.perf_counter() - t


def start(cmd: list[str], port: int, **kw: object) -> subprocess.Popen:
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    large.wait_port(port)
    return p


def stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()


def steps(port: int, aec: str, study: str, tmp: Path, want: str, between: Callable[[str], dict]) -> dict:
    out = {}
    got = tmp / "got"
    got.mkdir(exist_ok=True)
    out["get"] = getscu(port, aec, study, got)
    if received_sha(got) != want:
        raise RuntimeError(f"C-GET from {aec}: data set differs")
    out["get_mem"] = between("get")
    out["move"] = movescu(port, aec, study)
    if received_sha(tmp / "moved") != want:
        raise RuntimeError(f"C-MOVE from {aec}: data set differs")
    out["move_mem"] = between("move")
    return out


def run_dcmqrscp(tmp: Path, src: Path, study: str, scp_port: int, want: str) -> dict:
    db = tmp / "qrdb"
    db.mkdir()
    port = large.free_port()
    cfg = tmp / "dcmqrscp.cfg"
    cfg.write_text(textwrap.dedent(f"""
        NetworkTCPPort  = {port}
        MaxPDUSize      = 16384
        MaxAssociations = 16
        HostTable BEGIN
        storescp = (STORESCP, 127.0.0.1, {scp_port})
        HostTable END
        VendorTable BEGIN
        VendorTable END
        AETable BEGIN
        DCMQRSCP {db} RW (10, 1024mb) ANY
        AETable END
        """))
    subprocess.run(["/usr/bin/dcmqridx", str(db), str(src)], check=True, capture_output=True)
    p = start(["/usr/bin/dcmqrscp", "-c", str(cfg), str(port)], port)  # a child per association
    try:
        return steps(port, "DCMQRSCP", study, tmp, want, lambda _s: {})
    finally:
        stop(p)


def run_medrelay(tmp: Path, src: Path, study: str, scp_port: int, want: str) -> dict:
    d = tmp / "medrelay"
    d.mkdir()
    port = large.free_port()
    (d / "channels.yaml").write_text(textwrap.dedent(f"""
        store: {{url: "sqlite:///{d}/medrelay.db", blobs: "{d}/blobs"}}
        keys: {{kek_file: "{d}/keys.json"}}
        channels:
          dcm:
            source:
              type: dicom
              port: {port}
              ae_title: MEDRELAY
              calling_aets: [BENCH]
              move_destinations:
                STORESCP: {{host: 127.0.0.1, port: {scp_port}}}
        """))
    env = {**os.environ, "MEDRELAY_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "engine.cli", "run", str(d / "channels.yaml")]
    log = open(d / "log", "ab")
    p = subprocess.Popen(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        large.wait_port(port)
        large.storescu(port, "MEDRELAY", src)
    finally:
        stop(p)
    p = subprocess.Popen(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        large.wait_port(port)
        idle = large.proc_status(p.pid)["VmRSS"]

        def between(_step: str) -> dict:
            st = large.proc_status(p.pid)
            time.sleep(1.0)
            after = large.proc_status(p.pid)["VmRSS"]
            Path(f"/proc/{p.pid}/clear_refs").write_text("5")  # VmHWM back to the current RSS
            return {"peak": st["VmHWM"], "after": after}

        Path(f"/proc/{p.pid}/clear_refs").write_text("5")
        out = steps(port, "MEDRELAY", study, tmp, want, between)
        out["idle"] = idle
        return out
    finally:
        stop(p)
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, action="append", help="instance size in GiB (repeatable; dcmqrscp "
                    "serves at most 1 GiB a study, so 0.97 is the largest compared with it)")
    ap.add_argument("--dir", default=None, help="where to write the instances (default: a temporary folder)")
    args = ap.parse_args()
    for gib in args.gib or [0.97]:
        with tempfile.TemporaryDirectory(dir=args.dir) as t:
            tmp = Path(t)
            src = tmp / "large.dcm"
            uids = large.write_large_instance(src, int(gib * (1 << 30)))
            want = data_set_sha(src)
            (tmp / "moved").mkdir()
            scp_port = large.free_port()
            scp = start(["/usr/bin/storescp", "-aet", "STORESCP", "+B", "-od", str(tmp / "moved"), str(scp_port)],
                        scp_port)
            transfer = large.run_storescp(tmp, src)  # the bare DCMTK transfer of the same file, as a floor
            try:
                fits = src.stat().st_size < DCMQRSCP_STUDY_MAX
                dq = run_dcmqrscp(tmp, src, uids["StudyInstanceUID"], scp_port, want) if fits else None
                mr = run_medrelay(tmp, src, uids["StudyInstanceUID"], scp_port, want)
            finally:
                stop(scp)
            for step in ("get", "move"):
                mem = mr[f"{step}_mem"]
                theirs = (f"dcmqrscp {dq[step]:.1f} s, medrelay {mr[step]:.1f} s (ratio {mr[step] / dq[step]:.2f})"
                          if dq else f"dcmqrscp - (over its 1 GiB per study), medrelay {mr[step]:.1f} s")
                print(f"{src.stat().st_size / MIB:.0f} MiB C-{step.upper()}: storescu -> storescp {transfer:.1f} s, "
                      f"{theirs}; medrelay RSS idle "
                      f"{mr['idle'] / MIB:.0f} MiB, peak {mem['peak'] / MIB:.0f} MiB, after {mem['after'] / MIB:.0f} "
                      "MiB; byte-identical", flush=True)


if __name__ == "__main__":
    main()
