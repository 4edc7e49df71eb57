"""Media types of DICOMweb: Accept negotiation (PS3.18 8.7) and multipart/related bodies (RFC 2387).

An Accept header is a list of media ranges with parameters (``type=``,
``transfer-syntax=``, ``q=``); ``negotiate`` picks, for one kind of resource, the
first acceptable (media type, transfer syntax) pairs in client preference order, and
the retrieve code picks among them what it can produce for each instance
(``transfer-syntax=*`` = as stored).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydicom import uid as _uid

EXPLICIT_LE = _uid.ExplicitVRLittleEndian
ANY = "*"
# Media types of compressed frames / bulk pixel data (PS3.18 Table 8.7.3-4/5) by transfer syntax.
FRAME_MEDIA: dict[str, str] = {
    _uid.JPEGBaseline8Bit: "image/jpeg", _uid.JPEGExtended12Bit: "image/jpeg", _uid.JPEGLossless: "image/jpeg",
    _uid.JPEGLosslessSV1: "image/jpeg", _uid.JPEGLSLossless: "image/jls", _uid.JPEGLSNearLossless: "image/jls",
    _uid.JPEG2000Lossless: "image/jp2", _uid.JPEG2000: "image/jp2", _uid.JPEG2000MCLossless: "image/jpx",
    _uid.JPEG2000MC: "image/jpx", _uid.HTJ2KLossless: "image/jphc", _uid.HTJ2KLosslessRPCL: "image/jphc",
    _uid.HTJ2K: "image/jphc", _uid.RLELossless: "image/dicom-rle",
}


class NotAcceptable(ValueError):
    """No media type in Accept that the resource can be given in (406)."""


@dataclass(frozen=True)
class MediaRange:
    media_type: str  # e.g. multipart/related, application/dicom+json, image/jpeg, */*
    part_type: str | None  # the type= parameter of multipart/related
    transfer_syntax: str | None
    q: float


def _params(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(";"):
        k, sep, v = item.strip().partition("=")
        if sep:
            out[k.strip().lower()] = v.strip().strip('"')
    return out


def _split(header: str) -> Iterator[str]:
    """Comma-separated media ranges; commas inside quoted strings do not split."""
    buf, quoted = [], False
    for ch in header:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            yield "".join(buf)
            buf = []
        else:
            buf.append(ch)
    yield "".join(buf)


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges in preference order (q, then order given); empty header: ``*/*``."""
    if not header or not header.strip():
        return [MediaRange("*/*", None, None, 1.0)]
    out = []
    for n, item in enumerate(_split(header[:4096])):
        main, _, rest = item.strip().partition(";")
        if not main:
            continue
        p = _params(rest)
        try:
            q = float(p.get("q", "1"))
        except ValueError:
            q = 0.0
        if q <= 0:
            continue
        ts = p.get("transfer-syntax")
        out.append((-q, n, MediaRange(main.strip().lower(), (p.get("type") or "").lower() or None, ts, q)))
    return [m for _q, _n, m in sorted(out, key=lambda t: (t[0], t[1]))]


def _matches(have: str, want: str) -> bool:
    if want in ("*/*", "*"):
        return True
    a, _, b = want.partition("/")
    h1, _, h2 = have.partition("/")
    return a == h1 and (b in ("*", h2))


def single_syntaxes(ranges: Iterable[MediaRange], single: str) -> list[str] | None:
    """Transfer syntaxes of a single-part ``single`` (e.g. application/dicom, PS3.18 Table 8.7.4-1,
    as the Microsoft DICOM client asks for one instance) when Accept prefers it to any multipart
    response; None when a multipart range comes first (or ``single`` is not named)."""
    out: list[str] = []
    for r in ranges:
        if r.media_type in ("multipart/related", "multipart/*", "*/*") and not out:
            return None
        if r.media_type == single:
            out.append(r.transfer_syntax or EXPLICIT_LE)
    return out or None


def wanted_parts(ranges: Iterable[MediaRange], default_part: str) -> list[tuple[str, str | None]]:
    """(part media type, transfer syntax or None) a multipart response may use, in preference
    order: ``*/*`` as part type means any; None as syntax means the part type's default.
    Raises NotAcceptable when Accept names no multipart response at all."""
    out: list[tuple[str, str | None]] = []
    for r in ranges:
        if r.media_type == "multipart/related":
            out.append((r.part_type or default_part, r.transfer_syntax))
        elif r.media_type in ("*/*", "multipart/*"):
            out.append((default_part, r.transfer_syntax))
    if not out:
        raise NotAcceptable("the resource is given as multipart/related only")
    return out


def single(ranges: Iterable[MediaRange], offered: Iterable[str]) -> str:
    """The first of ``offered`` (single-part media types) that Accept allows."""
    offered = list(offered)
    for r in ranges:
        for have in offered:
            if _matches(have, r.media_type):
                return have
    raise NotAcceptable("none of the Accept media types can be given for this resource")


def new_boundary() -> str:
    return uuid.uuid4().hex


def part_head(boundary: str, content_type: str, location: str | None = None) -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if location:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def multipart_type(boundary: str, part_type: str) -> str:
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("latin-1")
