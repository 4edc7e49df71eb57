"""Real DICOM peers for tests: DCMTK command-line tools and test data that is on disk.

DCMTK is called by full path (pynetdicom installs console scripts with the same
names into the venv). Tests that need it fail under CI=true when it is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pydicom
import pydicom.data
from pydicom import dcmread

from tests.conftest import need_tool
from tests.ports import free_port, wait_port

DCMTK = Path("/usr/bin")
ENV = {**os.environ, "TCP_NODELAY": "1"}

# Checked to exist on disk (pydicom's bundled files + the pydicom-data package): a
# missing name would make get_testdata_file() try the network for ~20 s.
TEST_FILES = (
    "CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG-LL.dcm",
    "MR_small_RLE.dcm", "emri_small.dcm", "rtplan.dcm", "rtdose.dcm", "test-SR.dcm",
    "ExplVR_BigEnd.dcm", "image_dfl.dcm", "SC_rgb.dcm", "693_UNCI.dcm", "693_J2KR.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm", "MR2_J2KI.dcm", "OBXXXX1A_2frame.dcm", "JPEG-lossy.dcm",
    "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm", "liver.dcm",
)
_ROOTS = (Path(pydicom.data.__file__).parent / "test_files",
          Path(pydicom.__file__).parent.parent / "data_store" / "data")


def tool(name: str) -> str:
    return need_tool(str(DCMTK / name))


def data_file(name: str) -> Path:
    """A test file by name, found on disk only (never the network)."""
    for root in _ROOTS:
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    raise AssertionError(f"{name} is not on disk")


def unique_files(tmp: Path, names: tuple[str, ...] = TEST_FILES) -> list[Path]:
    """The test files, each with its own SOP Instance UID (some variants share one upstream).

    A file whose UID was seen already is copied with a new UID; pixel data stays as it
    is (encapsulated data is not touched by pydicom on save).
    """
    from pydicom.uid import generate_uid

    seen: set[str] = set()
    out = []
    tmp.mkdir(parents=True, exist_ok=True)
    for n in names:
        f = data_file(n)
        ds = dcmread(f)
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            f = tmp / n
            ds.save_as(f, enforce_file_format=True)
        seen.add(str(ds.SOPInstanceUID))
        out.append(f)
    return out


def run(name: str, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([tool(name), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def echoscu(port: int, aet: str = "TESTSCU", aec: str = "MEDRELAY") -> subprocess.CompletedProcess:
    return run("echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port))


def storescu(port: int, files: list[Path], aet: str = "TESTSCU", aec: str = "MEDRELAY",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run("storescu", "-v", "-R", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port),
               *[str(f) for f in files])


# storescu proposes a compressed syntax only when told which (DCMTK 3.6.7 options).
PROPOSE = {
    "1.2.840.10008.1.2.2": "-xb", "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
}


def storescu_any(port: int, files: list[Path], aet: str = "TESTSCU") -> list[str]:
    """Store files of any transfer syntax (one storescu run per syntax); the statuses in file order."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        ts = str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(PROPOSE.get(ts, ""), []).append(f)
    statuses: dict[Path, str] = {}
    for opt, group in groups.items():
        r = run("storescu", "-v", *([opt] if opt else ["-R"]), "-aet", aet, "-aec", "MEDRELAY", "127.0.0.1",
                str(port), *[str(f) for f in group])
        got = store_statuses(r.stdout)
        assert len(got) == len(group), r.stdout
        statuses.update(zip(group, got, strict=True))
    return [statuses[f] for f in files]


STATUS_RE = re.compile(r"Received Store Response \((?P<status>[^)]*)\)")


def store_statuses(output: str) -> list[str]:
    """The C-STORE response statuses in ``storescu -v`` output, in order ("Success", ...)."""
    return STATUS_RE.findall(output)


def findscu(port: int, level: str, keys: dict[str, str], model: str = "-S", aet: str = "TESTSCU",
            aec: str = "MEDRELAY", out_dir: Path | None = None) -> tuple[subprocess.CompletedProcess, list]:
    """C-FIND with findscu; returns the process and the response identifiers (pydicom Datasets)."""
    args = [model, "-v", "-aet", aet, "-aec", aec] + (["-k", f"QueryRetrieveLevel={level}"] if level else [])
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v != "" else k]
    results = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in out_dir.glob("rsp*.dcm"):
            f.unlink()
        args += ["-X", "-od", str(out_dir)]
    proc = run("findscu", *args, "127.0.0.1", str(port))
    if out_dir is not None:
        results = [dcmread(f) for f in sorted(out_dir.glob("rsp*.dcm"))]
    return proc, results


class StoreSCP:
    """DCMTK storescp in a subprocess, writing what it receives to ``out_dir``."""

    def __init__(self, out_dir: Path, aet: str = "STORESCP", extra: tuple[str, ...] = ()) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [tool("storescp"), "-aet", aet, "-od", str(out_dir), "+B", "-uf", *extra, str(self.port)],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # a pipe nobody reads could fill
        wait_port(self.port)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part-10 file (after the file meta), inflated if deflated."""
    import zlib

    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    ts = ds.file_meta.TransferSyntaxUID
    end = 132
    # walk the group 0002 elements (explicit VR little endian)
    while raw[end:end + 2] == b"\x02\x00":
        vr = raw[end + 4:end + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            end += 12 + int.from_bytes(raw[end + 8:end + 12], "little")
        else:
            end += 8 + int.from_bytes(raw[end + 6:end + 8], "little")
    body = raw[end:]
    return zlib.decompress(body, -15) if ts.is_deflated else body


def dicom_yaml(port: int = 0, *, calling: str = "[TESTSCU, GETSCU]", extra: str = "", routes: str = "",
               channel: str = "dcm") -> str:
    return f"""
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  {channel}:
    source:
      type: dicom
      port: {port}
      ae_title: MEDRELAY
      calling_aets: {calling}
{extra}
    routes: {routes or "[]"}
"""
