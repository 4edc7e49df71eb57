"""Large instances stored into medrelay next to DCMTK storescp receiving the same file (issue 13 item 3).

    .venv/bin/python bench/large.py --gib 1 [--gib 4] [--tls]

For each size: one multi-frame instance is generated on disk (random pixel data, written in
pieces: the bench itself never holds it), then sent with DCMTK storescu (TCP_NODELAY=1) to
storescp (writing to disk, no fsync) and to `medrelay run` (SQLite store, encrypted streamed
blob, fsync before commit) in the same run. Printed per receiver: wall time of the storescu
run (storescp twice: its default Maximum Length of 16 KiB, and its largest, 128 KiB; medrelay
announces 256 KiB), and for medrelay the engine's peak RSS during the store (VmHWM) and its RSS afterwards
(VmRSS), read from /proc/<pid>/status. The ratio is medrelay time / storescp time.

``--tls``: every association is mutual TLS (a CA and certificates made for the run,
tests/tls_certs.py): storescu ``+tls`` to storescp ``+tls`` and to medrelay's TLS listener.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.ports import free_port, wait_port  # noqa: E402  (standard library only)

MF_GRAYSCALE_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte Secondary Capture
FRAME = 1024 * 1024  # 1024 x 1024 x 8 bit
PIECE = 8 << 20


def write_large_instance(path: Path, size: int, *, patient_id: str = "STREAM^IN", sop_uid: str | None = None,
                         meta_sop_uid: str | None = None, study_uid: str | None = None,
                         private_bytes: int = 0) -> dict[str, str]:
    """A multi-frame instance of about ``size`` bytes of pixel data (whole 1 MiB frames), Explicit
    VR Little Endian, written in pieces. ``meta_sop_uid``, ``study_uid``: other UIDs for tests
    (a file meta that differs from the data set, an invalid Study Instance UID); ``private_bytes``: a
    private OB element of that size before the pixel data (a long header). Returns its UIDs."""
    frames = max(1, min(size, 0xFFFFFFFE) // FRAME)  # a defined-length OB holds < 4 GiB: 4 GiB is 4095 frames
    uids = {"SOPInstanceUID": sop_uid or generate_uid(), "StudyInstanceUID": study_uid or generate_uid(),
            "SeriesInstanceUID": generate_uid()}
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MF_GRAYSCALE_BYTE_SC
    ds.file_meta.MediaStorageSOPInstanceUID = meta_sop_uid or uids["SOPInstanceUID"]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MF_GRAYSCALE_BYTE_SC
    ds.SOPInstanceUID = uids["SOPInstanceUID"]
    ds.StudyInstanceUID = uids["StudyInstanceUID"]
    ds.SeriesInstanceUID = uids["SeriesInstanceUID"]
    ds.PatientID = patient_id
    ds.PatientName = "Stream^In"
    ds.StudyDate = "20261202"
    ds.Modality = "OT"
    ds.AccessionNumber = "LARGE1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = 1024
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if private_bytes:
        block = ds.private_block(0x0009, "MEDRELAY BENCH", create=True)
        block.add_new(0x10, "OB", os.urandom(private_bytes))
    ds.save_as(path, enforce_file_format=True)
    n = frames * FRAME
    with open(path, "ab") as f:
        f.write(b"\xe0\x7f\x10\x00OB\x00\x00" + n.to_bytes(4, "little"))
        left = n
        while left:
            k = min(PIECE, left)
            f.write(os.urandom(k))
            left -= k
    return uids


def data_set_offset(path: Path) -> int:
    """Where the data set starts in a Part-10 file (after the file meta group)."""
    with open(path, "rb") as f:
        head = f.read(144)
    return 144 + int.from_bytes(head[140:144], "little")


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS of a process in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


TLS: dict[str, list[str]] = {"scu": [], "scp": []}  # DCMTK options, filled by --tls


def use_tls(tmp: Path) -> dict[str, str]:
    """Mutual TLS for this run: DCMTK's options in ``TLS``; medrelay's ``tls:`` settings returned."""
    from tests.tls_certs import make_pki

    pki = make_pki(tmp / "pki")
    TLS["scu"] = ["+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca)]
    TLS["scp"] = ["+tls", str(pki.server.key), str(pki.server.cert), "+cf", str(pki.ca)]
    return {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca)}


def storescu(port: int, aec: str, path: Path) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/storescu", "-v", "-aet", "BENCH", "-aec", aec, *TLS["scu"], "127.0.0.1", str(port),
                        str(path)], env=env, capture_output=True, text=True, timeout=3600)
    dt = time.perf_counter() - t
    if "Received Store Response (Success)" not in r.stdout + r.stderr:
        raise RuntimeError(f"{aec}: store failed: {(r.stdout + r.stderr)[-2000:]}")
    return dt


def run_storescp(tmp: Path, path: Path, *extra: str) -> float:
    out = tmp / "storescp"
    out.mkdir()
    port = free_port()
    p = subprocess.Popen(["/usr/bin/storescp", *extra, *TLS["scp"], "-aet", "STORESCP", "-od", str(out), str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        return storescu(port, "STORESCP", path)
    finally:
        p.terminate()
        p.wait(30)
        shutil.rmtree(out, ignore_errors=True)


def run_medrelay(tmp: Path, path: Path, tls: dict[str, str] | None = None) -> dict[str, float]:
    d = tmp / "medrelay"
    d.mkdir()
    port = free_port()
    tls_yaml = ("{" + ", ".join(f'{k}: "{v}"' for k, v in tls.items()) + ", require_client_cert: true}"
                if tls else "null")
    (d / "channels.yaml").write_text(textwrap.dedent(f"""
        store: {{url: "sqlite:///{d}/medrelay.db", blobs: "{d}/blobs"}}
        keys: {{kek_file: "{d}/keys.json"}}
        channels:
          dcm:
            source: {{type: dicom, port: {port}, ae_title: MEDRELAY, calling_aets: [BENCH], tls: {tls_yaml}}}
        """))
    env = {**os.environ, "MEDRELAY_LOG_LEVEL": "warning"}
    p = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(d / "channels.yaml")], cwd=d, env=env,
                         stdout=open(d / "log", "ab"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, 60.0, p)
        idle = proc_status(p.pid)["VmRSS"]
        dt = storescu(port, "MEDRELAY", path)
        peak = proc_status(p.pid)["VmHWM"]
        time.sleep(2.0)
        after = proc_status(p.pid)["VmRSS"]
        return {"time": dt, "idle": idle, "peak": peak, "after": after}
    finally:
        p.terminate()
        p.wait(60)
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, action="append", help="instance size in GiB (repeatable)")
    ap.add_argument("--dir", default=None, help="where to write the instances (default: a temporary folder)")
    ap.add_argument("--tls", action="store_true", help="mutual TLS on every association")
    args = ap.parse_args()
    sizes = args.gib or [1.0]
    mib = 1 << 20
    for gib in sizes:
        with tempfile.TemporaryDirectory(dir=args.dir) as t:
            tmp = Path(t)
            src = tmp / "large.dcm"
            write_large_instance(src, int(gib * (1 << 30)))
            tls = use_tls(tmp) if args.tls else None
            scp = run_storescp(tmp, src)
            scp_big = run_storescp(tmp, src, "--max-pdu", "131072")  # its largest; medrelay announces 256 KiB
            mr = run_medrelay(tmp, src, tls)
            print(f"{gib:g} GiB{' over TLS' if tls else ''}: storescp {scp:.1f} s "
                  f"(with --max-pdu 131072: {scp_big:.1f} s), "
                  f"medrelay {mr['time']:.1f} s (ratio {mr['time'] / scp:.2f} / {mr['time'] / scp_big:.2f}); "
                  f"medrelay RSS idle {mr['idle'] / mib:.0f} MiB, peak {mr['peak'] / mib:.0f} MiB, "
                  f"after {mr['after'] / mib:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
