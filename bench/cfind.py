"""C-FIND latency against the archive index at 1 000 and 20 000 instances, next to baselines.

For each archive size the instances are synthesised (one patient, study, series and
instance each; 1 % of the patients are named DOE) and filed through the index code (the
network would only make the set-up slow). Each query is then answered, in the same run, by:

  (a) medrelay in process, through the blind-term index (``QueryRetrieve.find_responses``);
  (b) medrelay in process with term narrowing switched off: every candidate row decrypted,
      which is what an exact PatientID or a PatientName wildcard cost before issue 9;
  (c) `medrelay run` over the network: a pynetdicom SCU, one association, C-FIND after C-FIND.

DCMTK's dcmqrscp was tried as a further baseline and left out: its index file holds a few
hundred studies (dcmqridx 3.6.7 aborts past ~550 here), and each instance here is a study.

Medians of --repeat runs (the full-decrypt baseline at most 3). Run:

    .venv/bin/python bench/cfind.py [--sizes 1000 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from tests.ports import free_port, wait_port  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
TS = "1.2.840.10008.1.2.1"
GIVEN = ("JOHN", "JANE", "ANNA", "PETER", "MARIA")


def synth(i: int) -> dict[str, dict[str, Any]]:
    family = "DOE" if i % 100 == 7 else f"FAMILY{i % 997:03d}"
    uid = f"1.2.826.0.1.3680043.10.11.{i}"
    return {
        "PATIENT": {"PatientName": f"{family}^{GIVEN[(i // 100) % len(GIVEN)]}", "PatientID": f"PID{i:06d}"},
        "STUDY": {"StudyInstanceUID": uid, "StudyDate": "20240101", "StudyTime": "120000",
                  "AccessionNumber": f"A{i:06d}"},
        "SERIES": {"SeriesInstanceUID": uid + ".1", "Modality": "CT", "SeriesNumber": 1},
        "IMAGE": {"SOPInstanceUID": uid + ".1.1", "SOPClassUID": CT, "InstanceNumber": 1},
    }


def queries(n: int) -> list[tuple[str, dict[str, str]]]:
    mid = n // 2
    return [
        ("PatientID exact", {"PatientID": f"PID{mid:06d}"}),
        ("AccessionNumber exact", {"AccessionNumber": f"A{mid:06d}"}),
        ("PatientName exact", {"PatientName": f"FAMILY{mid % 997:03d}^{GIVEN[(mid // 100) % len(GIVEN)]}"}),
        ("PatientName DOE*", {"PatientName": "DOE*"}),
        ("PatientName DOE^J*", {"PatientName": "DOE^J*"}),
    ]


def identifier(keys: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for k in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "StudyDate"):
        setattr(ds, k, keys.get(k, ""))
    return ds


def median_ms(repeat: int, fn: Callable[..., int], *args: Any, **kwargs: Any) -> tuple[float, int]:
    times, matches = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        matches = fn(*args, **kwargs)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, matches


# -- medrelay -------------------------------------------------------------------------
def build_store(d: Path, n: int) -> Any:
    from engine.security.crypto import KeyRing
    from engine.store.db import Store
    from engine.store.dicom import index as idx

    store = Store(f"sqlite:///{d}/medrelay.db", d / "blobs", KeyRing(d / "keys.json"))
    store.migrate()
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    t = time.perf_counter()
    with store.engine.begin() as conn:
        for i in range(n):
            idx.index_instance(conn, store, hkey, synth(i), message_id=f"b{i}", transfer_syntax=TS, digest="d",
                               size=1)
    print(f"  filed {n} instances through the index in {time.perf_counter() - t:.1f} s")
    return store


def in_process(store: Any, keys: dict[str, str], *, narrowing: bool) -> int:
    from engine.store.dicom import terms
    from listeners.dicom_qr import QueryRetrieve

    qr = QueryRetrieve(types.SimpleNamespace(store=store, keyring=store.keyring, channel="bench"), ae_title="MR",
                       fold_pn=True, move_destinations={})
    real = terms.condition
    if not narrowing:
        terms.condition = lambda *a, **k: None  # type: ignore[assignment]
    try:
        return len(qr.find_responses(identifier(keys), "study"))
    finally:
        terms.condition = real  # type: ignore[assignment]


def start_medrelay(d: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = d / "channels.yaml"
    cfg.write_text(textwrap.dedent(f"""
        store: {{url: "sqlite:///{d}/medrelay.db", blobs: "{d}/blobs"}}
        keys: {{kek_file: "{d}/keys.json"}}
        log: {{level: warning}}
        channels:
          bench:
            source: {{type: dicom, port: {port}, ae_title: MEDRELAY, calling_aets: [BENCH]}}
        """))
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(cfg)], cwd=d,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 60, proc)
    return proc, port


def network_find(port: int, aec: str) -> Callable[[dict[str, str]], int]:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    if not assoc.is_established:
        raise SystemExit(f"association to {aec} refused")
    # Without it Nagle and the peer's delayed ACK add ~40 ms to each small C-FIND request.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run(keys: dict[str, str]) -> int:
        got = 0
        for status, ident in assoc.send_c_find(identifier(keys), StudyRootQueryRetrieveInformationModelFind):
            if status and status.Status in (0xFF00, 0xFF01) and ident is not None:
                got += 1
        return got

    run.release = assoc.release  # type: ignore[attr-defined]
    return run


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    work = Path(tempfile.mkdtemp(prefix="medrelay-cfind-"))
    rows = []
    try:
        for n in args.sizes:
            print(f"archive of {n} instances")
            d = work / f"n{n}"
            d.mkdir()
            store = build_store(d, n)
            proc, port = start_medrelay(d)
            try:
                net = network_find(port, "MEDRELAY")
                for name, keys in queries(n):
                    idx_ms, matches = median_ms(args.repeat, in_process, store, keys, narrowing=True)
                    full_ms, full_matches = median_ms(min(args.repeat, 3), in_process, store, keys, narrowing=False)
                    assert full_matches == matches, (name, matches, full_matches)
                    net_ms, net_matches = median_ms(args.repeat, net, keys)
                    assert net_matches == matches, (name, matches, net_matches)
                    rows.append((n, name, matches, idx_ms, full_ms, net_ms))
                    print(f"  {name:<22} {matches:>4} matches  index {idx_ms:7.1f} ms  full-decrypt "
                          f"{full_ms:7.1f} ms  network {net_ms:7.1f} ms")
                net.release()  # type: ignore[attr-defined]
            finally:
                stop(proc)
                store.dispose()
        print()
        print("| instances | query | matches | index, in process | full decrypt, in process (before) | "
              "index, C-FIND over the network |")
        print("|---:|---|---:|---:|---:|---:|")
        for n, name, matches, idx_ms, full_ms, net_ms in rows:
            print(f"| {n} | {name} | {matches} | {idx_ms:.1f} ms | {full_ms:.1f} ms | {net_ms:.1f} ms |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TCP_NODELAY", "1")
    main()
