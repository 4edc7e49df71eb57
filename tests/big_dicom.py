"""Shared setup of the large-instance memory tests: the instance is stored by one `medrelay run`
process, which then stops, so the VmHWM a test measures in the next process on the same data is
that of its retrievals alone (not of the C-STORE that brought the data in)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_peers import storescu
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"


def ct_header(ts: str, frames: int | None, rows: int, cols: int, patient_id: str,
              name: str = "Multi^Frame") -> Dataset:
    """The elements (and file meta) of a 16-bit MONOCHROME2 CT without its Pixel Data, which the
    large-instance tests append in pieces (never whole in memory); ``frames`` None: no
    NumberOfFrames (a single-frame CT)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.update({"PatientID": patient_id, "PatientName": name, "Modality": "CT", "Rows": rows,
               "Columns": cols, "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 0,
               "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2"})
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


def store_with_a_first_process(proc, port: int, src: Path) -> None:
    """Start ``proc`` (a conftest MedrelayProc), send ``src`` with DCMTK storescu to ``port``, check
    the C-STORE succeeded, then stop the process cleanly (exit status 0)."""
    proc.start()
    try:
        proc.wait_port(port, 60)
        r = storescu(port, [src])
        assert "Success" in r.stdout, r.stdout[-2000:]
    finally:
        assert proc.terminate(60) == 0


def disk_fills_after(files: Any, after: int) -> Callable[[], None]:
    """Make every blob stream of ``files`` (an engine's blob folder) fail with ENOSPC once ``after``
    bytes are written, as a disk that fills mid-instance; returns the function that undoes it."""
    real_open = files.open_stream

    class FullDisk:
        def __init__(self) -> None:
            self.inner = real_open()

        def write(self, data: bytes) -> None:
            if self.inner.written > after:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.inner.write(data)

        def commit(self, blob_id: str) -> None:
            self.inner.commit(blob_id)

        def abort(self) -> None:
            self.inner.abort()

    files.open_stream = FullDisk  # the folder object's own method: every stream of this engine

    def restore() -> None:
        files.open_stream = real_open

    return restore
