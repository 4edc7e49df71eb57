"""DICOM C-STORE throughput: medrelay's full path against DCMTK storescp, Orthanc and a bare pynetdicom SCP.

DCMTK storescu sends N CT instances of ~0.5 MB (copies of pydicom-data 693_UNCI.dcm
with new SOP Instance UIDs) over one association, then over 4 associations in
parallel, to:
  (a) DCMTK storescp writing files to disk,
  (b) a bare pynetdicom SCP writing event.encoded_dataset() to disk,
  (c) Orthanc (Debian package ``orthanc``): SQLite index, SyncStorageArea true (each file
      fsynced before the C-STORE answer), a fresh storage folder under the bench's tmp dir,
  (d) `medrelay run` with a DICOM listener: commit (WAL, synchronous=FULL), index, encryption.
All in the same run, so the ratios compare like with like on this machine.
Orthanc listens on every interface and has no bind option, so with Orthanc among the
receivers (the default when /usr/sbin/Orthanc exists) the bench re-runs itself inside a
network namespace of its own (``unshare -n``, loopback up; needs root): every receiver and
every storescu then talks over that namespace's loopback only, nothing is reachable from outside.
A shared VM swings by +-30 % from one minute to the next, so the receivers take
turns for --rounds rounds (with an untimed sync between runs, so no receiver pays
for the writeback of the one before) and the medians are printed, with each receiver's CPU
time per instance (user + system, from /proc) as a steadier second figure.

    .venv/bin/python bench/dicom.py [--count 500] [--parallel 4] [--rounds 3]
        [--receivers dcmtk,pynetdicom,orthanc,medrelay] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netns import in_namespace, inside  # noqa: E402  (bench/netns.py: run as a script from bench/)

from tests.ports import free_port, wait_port  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
KINDS = ("dcmtk", "pynetdicom", "orthanc", "medrelay")

BARE_SCP = textwrap.dedent("""
    import sys, os
    from pynetdicom import AE, evt, AllStoragePresentationContexts
    out = sys.argv[2]
    def handle(event):
        with open(os.path.join(out, event.request.AffectedSOPInstanceUID), "wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000
    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = int(sys.argv[3])
    ae.maximum_associations = 16
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, handle)])
""")


def orthanc_config(port: int, d: Path, max_pdu: int) -> dict[str, object]:
    """What the issue measured Orthanc with: SQLite index, SyncStorageArea, no compression."""
    return {
        "Name": "bench", "DicomAet": "ORTHANC", "DicomPort": port, "HttpServerEnabled": False,
        "StorageDirectory": str(d / "storage"), "IndexDirectory": str(d / "index"),
        "SyncStorageArea": True, "StorageCompression": False, "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True, "MaximumPduLength": min(max_pdu, 131072),  # its allowed range
        "DicomThreadsCount": 4, "SaveJobs": False, "Plugins": [],
    }


def make_files(n: int, out: Path) -> list[Path]:
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    src = Path(__import__("data_store").__file__).parent / "data" / "693_UNCI.dcm"
    ds = dcmread(src)
    files = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = out / f"ct{i:04}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(port: int, aec: str, files: list[Path], parallel: int) -> float:
    chunks = [files[i::parallel] for i in range(parallel)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port),
                               *map(str, c)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for c in chunks]
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"storescu failed: {out.decode()[-2000:]}")
    return time.perf_counter() - t0


class Target:
    def __init__(self, name: str, aec: str, cmd: list[str], port: int, cwd: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.aec, self.port = name, aec, port
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def medrelay_yaml(port: int, data: Path, max_pdu: int) -> str:
    return textwrap.dedent(f"""
        store: {{url: "sqlite:///{data}/medrelay.db", blobs: "{data}/blobs"}}
        keys: {{kek_file: "{data}/keys.json"}}
        log: {{level: warning}}
        channels:
          bench:
            source: {{type: dicom, port: {port}, ae_title: MEDRELAY, calling_aets: [BENCH], max_pdu: {max_pdu}}}
        """)


def start(kind: str, work: Path, max_pdu: int, baseline: Path | None = None) -> Target:
    port = free_port()
    d = work / f"{kind}-{port}"
    d.mkdir()
    if kind == "dcmtk":
        pdu = str(min(max_pdu, 131072))  # storescp's upper limit
        return Target("DCMTK storescp", "STORESCP",
                      [STORESCP, "-aet", "STORESCP", "-od", str(d), "--max-pdu", pdu, str(port)], port, d)
    if kind == "orthanc":
        cfg = d / "orthanc.json"
        cfg.write_text(json.dumps(orthanc_config(port, d, max_pdu)))
        return Target("Orthanc", "ORTHANC", [ORTHANC, str(cfg)], port, d)
    if kind == "pynetdicom":
        script = d / "bare.py"
        script.write_text(BARE_SCP)
        return Target("bare pynetdicom", "BARE", [sys.executable, str(script), str(port), str(d), str(max_pdu)],
                      port, d)
    cfg = d / "channels.yaml"
    cfg.write_text(medrelay_yaml(port, d / "data", max_pdu))
    if kind == "baseline":  # the same, from another source tree (its modules first on the path)
        assert baseline is not None
        return Target("medrelay (base)", "MEDRELAY", [sys.executable, "-m", "engine.cli", "run", str(cfg)], port, d,
                      env={**ENV, "PYTHONPATH": str(baseline)})
    return Target("medrelay", "MEDRELAY", [sys.executable, "-m", "engine.cli", "run", str(cfg)], port, d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=500)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--max-pdu", type=int, default=262144, help="max PDU every receiver announces")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all receivers, for medians")
    ap.add_argument("--receivers", default=",".join(k for k in KINDS if k != "orthanc" or Path(ORTHANC).exists()),
                    help="comma-separated, from " + ",".join(KINDS))
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="also run medrelay from this source tree (a copy of an earlier commit) in the same "
                         "rounds, as 'medrelay (base)': a before/after of a change on the same machine minutes")
    args = ap.parse_args()
    kinds = [k for k in KINDS if k in args.receivers.split(",")]
    if args.baseline_tree is not None:
        if not (args.baseline_tree / "engine" / "cli").is_dir():
            raise SystemExit(f"{args.baseline_tree}: not a medrelay source tree")
        kinds.append("baseline")
    for tool in (STORESCU, STORESCP) + ((ORTHANC,) if "orthanc" in kinds else ()):
        if not Path(tool).exists():
            raise SystemExit(f"{tool} missing: install DCMTK (and the orthanc package for Orthanc)")
    if "orthanc" in kinds:
        in_namespace("bench/dicom.py with Orthanc", "; or leave it out: --receivers dcmtk,pynetdicom,medrelay")
    work = Path(tempfile.mkdtemp(prefix="medrelay-bench-"))
    try:
        files = make_files(args.count, work)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{args.count} instances, {mb:.0f} MB, max PDU {args.max_pdu}, {os.cpu_count()} CPUs"
              + (" (in a network namespace of its own)" if inside() else ""))
        rates: dict[tuple[str, int], list[float]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        names = {}
        for _ in range(args.rounds):
            for par in (1, args.parallel):
                for kind in kinds:
                    # Untimed: flush what the previous receiver left dirty (DCMTK and the bare SCP
                    # do not fsync), or its writeback lands in the next receiver's run.
                    os.sync()
                    t = start(kind, work, args.max_pdu, args.baseline_tree)
                    try:
                        c0 = cpu_seconds(t.proc.pid)
                        secs = send(t.port, t.aec, files, par)
                        used = cpu_seconds(t.proc.pid) - c0
                    finally:
                        t.stop()
                    names[kind] = t.name
                    rates.setdefault((kind, par), []).append(args.count / secs)
                    cpu.setdefault((kind, par), []).append(1000 * used / args.count)
        print(f"medians of {args.rounds} rounds")
        print(f"{'receiver':16} {'assoc':>5} {'inst/s':>8} {'MB/s':>7} {'CPU ms/inst':>11}   inst/s per round")
        for par in (1, args.parallel):
            for kind in kinds:
                r = statistics.median(rates[(kind, par)])
                each = " ".join(f"{x:.0f}" for x in rates[(kind, par)])
                print(f"{names[kind]:16} {par:5} {r:8.1f} {r * mb / args.count:7.1f} "
                      f"{statistics.median(cpu[(kind, par)]):11.2f}   {each}")

        def ratio(base: str, par: int) -> float:  # median of the per-round ratios
            return statistics.median(m / b for m, b in zip(rates[("medrelay", par)], rates[(base, par)], strict=True))

        if "medrelay" in kinds:
            for par in (1, args.parallel):
                print(f"{par} assoc: " + "   ".join(f"medrelay / {names[b]}: {ratio(b, par):.2f}"
                                                    for b in kinds if b != "medrelay"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
