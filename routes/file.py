"""The ``type: file`` destination: drop each message into a folder, durably.

File names are ``<envelope id>.<ext>``: the id is random (engine.envelope.new_id),
so no peer-supplied value (UIDs, MSH-10, patient ids) ever reaches the file system,
and a retry of the same delivery overwrites the same file instead of adding one.
Written as tmp + fsync + rename + fsync of the folder, so a reader polling the
folder never sees half a file and a crash never leaves a file that was reported done
but is not on disk.

A write can block (a hung network mount, a full FUSE queue): it runs on a thread of the
destination's own (routes/blocking.py) and the delivery fails after ``timeout`` seconds
and is retried; while that write is still stuck, later ones wait for it rather than
start a second write of the same file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from engine.components import ComponentConfig, DeliveryError
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.registry import component
from routes.blocking import BlockingCalls

EXTENSIONS = {"hl7v2": ".hl7", "dicom": ".dcm", "fhir": ".json"}


class FileDestinationConfig(ComponentConfig):
    """Write each message to a file in a folder (one file per delivery, named after the message id)."""

    type: Literal["file"]
    path: str = Field(..., description="folder to write to; created (0700) when missing; relative paths are "
                      "relative to the YAML file, like the store's")
    fsync: bool = Field(True, description="fsync file and folder before reporting success (keep on)")
    mode: int = Field(0o600, description="file permission bits; messages carry PHI, so owner-only by default")
    timeout: float = Field(60.0, gt=0, description="seconds one write (file, fsyncs, rename) may take before the "
                           "delivery fails and is retried")


def write_atomic(folder: Path, name: str, data: bytes, *, fsync: bool = True, mode: int = 0o600) -> Path:
    """Write ``data`` to ``folder/name`` so that it appears complete or not at all."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = folder / name
    tmp = folder / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    if fsync:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return final


class FileDestination:
    def __init__(self, config: FileDestinationConfig, base_dir: Path | None = None) -> None:
        self.config = config
        folder = Path(config.path)
        self.folder = folder if folder.is_absolute() or base_dir is None else base_dir / folder
        self.calls = BlockingCalls("file")

    @property
    def deadline(self) -> float:
        """Seconds one ``send`` may take (engine.pipeline enforces it as a backstop)."""
        return self.config.timeout

    async def send(self, envelope: Envelope) -> str | None:
        """Write the payload; returns the file name (an id, not PHI)."""
        name = envelope.id + EXTENSIONS.get(envelope.kind, ".bin")
        try:
            await self.calls.run(lambda: write_atomic(self.folder, name, envelope.payload, fsync=self.config.fsync,
                                                      mode=self.config.mode), timeout=self.config.timeout, what="write")
        except OSError as e:
            raise DeliveryError(f"cannot write {name}: {e.strerror or type(e).__name__}") from None
        return name

    async def close(self) -> None:
        return None


@component("destination", "file", config=FileDestinationConfig)
def build(config: FileDestinationConfig, ctx: ComponentContext) -> Any:
    """Write messages to a folder as <message id>.hl7/.dcm/.json (atomic, fsynced)."""
    return FileDestination(config, ctx.settings.base_dir if ctx is not None and ctx.settings is not None else None)
