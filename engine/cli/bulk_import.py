"""`medrelay import`: load folders of DICOM, HL7 v2 or FHIR files into a running channel.

The files go in through the channel's own protocol (C-STORE, MLLP, FHIR REST), as a
modality, an HIS or an app would send them, so they get exactly the treatment live
traffic gets: the same checks, de-duplication, indexing, routes and audit trail, and an
answer per file. This is the migration path from another archive or interface engine.
"""

from __future__ import annotations

import json
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from engine.hl7.ack import parse_ack
from engine.hl7.mllp import Frame, FrameParser, frame

Progress = Callable[[int], object]
_MSH_START = re.compile(rb"(?:^|\r)(?=MSH\|)")


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and every file below folders named, in a stable order (hidden files skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(str(p))
    return out


def hl7_messages(data: bytes) -> list[bytes]:
    """Messages in one file: MLLP frames if it has any, else text split before each MSH."""
    if b"\x0b" in data:
        return [ev.payload for ev in FrameParser(64 * 1024 * 1024).feed(data) if isinstance(ev, Frame)]
    text = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    parts = [p.strip(b"\r") for p in _MSH_START.split(text)]
    return [p + b"\r" for p in parts if p.startswith(b"MSH|")]


def import_hl7(host: str, port: int, files: list[Path], progress: Progress, timeout: float = 30.0) -> Counter[str]:
    """Send each message and wait for its ACK; counts by MSA-1 (AA, AE, AR, CA, ...)."""
    counts: Counter[str] = Counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        parser = FrameParser(16 * 1024 * 1024)
        for f in files:
            for msg in hl7_messages(f.read_bytes()):
                sock.sendall(frame(msg))
                ack = None
                while ack is None:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("the engine closed the connection")
                    frames = [ev for ev in parser.feed(data) if isinstance(ev, Frame)]
                    ack = frames[0].payload if frames else None
                counts[parse_ack(ack).code] += 1
                progress(1)
    return counts


def import_dicom(host: str, port: int, called_aet: str, calling_aet: str, files: list[Path],
                 progress: Progress) -> Counter[str]:
    """C-STORE each file (sent in its own transfer syntax); counts by outcome."""
    from pydicom import dcmread
    from pynetdicom import AE

    metas = []
    counts: Counter[str] = Counter()
    for f in files:
        try:
            meta = dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
            metas.append((f, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception:
            counts["not DICOM"] += 1
            progress(1)
    # at most 128 presentation contexts per association (PS3.8): one association per group
    pairs = sorted({(c, t) for _, c, t in metas})
    for i in range(0, len(pairs), 128):
        group = set(pairs[i:i + 128])
        ae = AE(ae_title=calling_aet)
        for c, t in group:
            ae.add_requested_context(c, [t])
        assoc = ae.associate(host, port, ae_title=called_aet)
        if not assoc.is_established:
            raise ConnectionError(f"association with {called_aet}@{host}:{port} was not accepted")
        try:
            for f, c, t in metas:
                if (c, t) not in group:
                    continue
                status = assoc.send_c_store(f)
                code = getattr(status, "Status", None)
                counts["stored" if code == 0 else f"status 0x{code:04X}" if code is not None else "no answer"] += 1
                progress(1)
        finally:
            assoc.release()
    return counts


def import_fhir(base_url: str, token: str | None, files: list[Path], progress: Progress) -> Counter[str]:
    """POST each resource (or transaction/batch Bundle) as JSON; counts by HTTP status."""
    import httpx

    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    counts: Counter[str] = Counter()
    with httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=60) as client:
        for f in files:
            body = f.read_bytes()
            try:
                res = json.loads(body)
                rtype = res["resourceType"]
            except (ValueError, KeyError, TypeError):
                counts["not FHIR JSON"] += 1
                progress(1)
                continue
            bundle = rtype == "Bundle" and res.get("type") in ("transaction", "batch")
            r = client.post("/" if bundle else f"/{rtype}", content=body)
            counts[str(r.status_code)] += 1
            progress(1)
    return counts
