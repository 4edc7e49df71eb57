"""HL7 v2 validation with hl7apy: outgoing messages we build, and messages received at intake.

hl7apy 1.3.5 validates message structure, segment cardinality, data types and
field lengths (``VALIDATION_LEVEL.STRICT`` + ``validate()``). One known gap: its
v2.5.1 ORM_O01 definition treats the OBR|RQD|RQ1|RXO|ODS|ODT choice group as if every
member were required, so a correct ORM^O01 fails. For that structure only, each
segment is validated strictly on its own instead (fields, types, lengths), which
is as far as hl7apy can go there.

hl7apy is pure Python and its cost grows with the number of elements (about 1.5 ms
per segment, 0.6 ms per repetition, faster than linear past a few thousand): 50 000
repetitions of PID-3 took over a minute and 700 MB. So intake validation is bounded
twice: ``check_limits`` refuses messages over a size / segment / repetition limit before
any parse (a few byte counts), and the parse itself runs in a worker process of its own
(``python -m transforms.hl7_validate``, see listeners/hl7_validation.py) that is killed
when it overruns its time budget. This module is that worker's whole program: it reads
requests on stdin and answers on stdout, one at a time.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import BinaryIO

from engine.hl7.message import (
    APPLICATION_INTERNAL_ERROR,
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    UNSUPPORTED_VERSION_ID,
    Header,
    HL7Error,
    read_header,
)

SEGMENT_ONLY = frozenset({"ORM_O01"})


class HL7ValidationError(ValueError):
    """The message we built does not conform; carries hl7apy's reason."""


def validate_v2(text: str, structure: str, version: str = "2.5.1") -> None:
    """Raise HL7ValidationError unless ``text`` (segments split by CR) conforms."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message, parse_segment

    try:
        if structure in SEGMENT_ONLY:
            for line in text.split("\r")[1:]:
                if line:
                    parse_segment(line, version=version, validation_level=VALIDATION_LEVEL.STRICT).validate()
            parse_message(text.split("\r", 1)[0], validation_level=VALIDATION_LEVEL.TOLERANT)
            return
        parse_message(text, validation_level=VALIDATION_LEVEL.STRICT).validate()
    except (HL7apyException, ValueError, KeyError, IndexError) as e:
        raise HL7ValidationError(f"{structure}: {e}") from e


# -- intake: limits first, then hl7apy -------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Limits:
    """What one message may cost the validator; past any of them it is refused unparsed."""

    max_bytes: int = 1024 * 1024
    max_segments: int = 1000
    max_repetitions: int = 200  # in any one field


def check_limits(header: Header, payload: bytes, limits: Limits) -> None:
    """Refuse (AR 207, with the limit named) a message too big to validate in bounded time.

    A few ``bytes.count`` calls over the message (C speed, well under a millisecond per
    megabyte); per-field repetitions are only counted in a segment whose total is over
    the limit, so the common case never splits fields.
    """
    if len(payload) > limits.max_bytes:
        raise HL7Error(APPLICATION_INTERNAL_ERROR, f"message of {len(payload)} bytes is over this receiver's "
                       f"validation limit of {limits.max_bytes} bytes", header=header)
    segments = payload.count(b"\r") + payload.count(b"\n") - payload.count(b"\r\n")
    if segments > limits.max_segments:
        raise HL7Error(APPLICATION_INTERNAL_ERROR, f"message has {segments} segments, over this "
                       f"receiver's validation limit of {limits.max_segments}", header=header)
    # The delimiters are single ASCII bytes in every charset read_header accepts.
    rep = header.delimiters.repetition.encode("latin-1")
    if payload.count(rep) < limits.max_repetitions:  # n separators: at most n + 1 repetitions
        return
    fs = header.delimiters.field.encode("latin-1")
    for seg in payload.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r"):
        if seg.count(rep) < limits.max_repetitions:
            continue
        name = seg[:3].decode("latin-1", "replace")
        first = 1 if name == "MSH" else 0  # MSH-1 is the separator itself: split index n is MSH-(n+1)
        for i, value in enumerate(seg.split(fs)):
            reps = value.count(rep) + 1
            if i and reps > limits.max_repetitions:
                n = i + first
                raise HL7Error(APPLICATION_INTERNAL_ERROR, f"{name}-{n} has {reps} repetitions, over this "
                               f"receiver's validation limit of {limits.max_repetitions}",
                               location=f"{name}^1^{n}" if name.isalnum() else None, header=header)


def validate_intake(header: Header, payload: bytes, level: str) -> None:
    """Validate a received message with hl7apy; raise ``HL7Error`` with the 0357 code that fits.

    ``level`` is ``structure`` (segments and required fields) or ``strict`` (also data
    types and lengths). Runs in a validation worker process, never in the event loop.
    """
    from hl7apy import exceptions as hx
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    text = header.decode(payload).replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    vl = VALIDATION_LEVEL.STRICT if level == "strict" else VALIDATION_LEVEL.TOLERANT
    try:
        msg = parse_message(text, validation_level=vl, find_groups=True)
        msg.validate()
    except hx.UnsupportedVersion:
        raise HL7Error(UNSUPPORTED_VERSION_ID, f"version {header.version[:16]!r} is not supported by the validator",
                       location="MSH^1^12", header=header) from None
    except hx.ValidationError as e:
        what = str(e)
        child = what.rsplit(" ", 1)[-1]
        if "Missing required child" in what and "_" in child.split(".")[-1] and \
                child.split(".")[-1].split("_")[-1].isdigit():
            seg, _, fld = child.split(".")[-1].partition("_")
            raise HL7Error(REQUIRED_FIELD_MISSING, f"required field {seg}-{fld} is missing",
                           location=f"{seg}^1^{fld}", header=header) from None
        if "Missing required child" in what:
            raise HL7Error(SEGMENT_SEQUENCE_ERROR, f"required segment or group {child} is missing",
                           header=header) from None
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, f"structure not valid: {what[:200]}", header=header) from None
    except (hx.ChildNotFound, hx.ChildNotValid, hx.InvalidName, hx.MaxChildLimitReached) as e:
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, f"structure not valid: {str(e)[:200]}", header=header) from None
    except (hx.OperationNotAllowed, AttributeError):
        # hl7apy could not find the message structure for MSH-9.
        code = UNSUPPORTED_EVENT_CODE if header.trigger_event and not header.message_structure \
            else UNSUPPORTED_MESSAGE_TYPE
        raise HL7Error(code, f"message type {header.message_code[:20]!r} is not known for version "
                       f"{header.version[:16]} (set MSH-9.3 to its structure)", location="MSH^1^9",
                       header=header) from None
    except (hx.HL7apyException, ValueError) as e:
        raise HL7Error(DATA_TYPE_ERROR, f"data type error: {str(e)[:200]}", header=header) from None


# -- the worker process ------------------------------------------------------------------------
# Request: level (1 byte: b"s" structure, b"S" strict), length (4 bytes, big endian), message.
# Answer: length (4 bytes) and a JSON object: {} when valid, else {"code", "text", "location"}.
LEVEL_BYTES = {"structure": b"s", "strict": b"S"}
_LEVELS = {v: k for k, v in LEVEL_BYTES.items()}


def encode_request(level: str, payload: bytes) -> bytes:
    return LEVEL_BYTES[level] + len(payload).to_bytes(4, "big") + payload


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def answer(level: str, payload: bytes) -> dict[str, object]:
    """One request's answer (what the worker writes back)."""
    try:
        header = read_header(payload)
        validate_intake(header, payload, level)
    except HL7Error as e:
        return {"code": e.code, "text": e.text, "location": e.location}
    except MemoryError:
        return {"code": APPLICATION_INTERNAL_ERROR, "text": "validation needed more memory than allowed"}
    except RecursionError:
        return {"code": APPLICATION_INTERNAL_ERROR, "text": "message nests too deeply to validate"}
    except Exception:  # hl7apy's own bugs: the message is refused, the worker carries on
        return {"code": APPLICATION_INTERNAL_ERROR, "text": "the validator failed on this message"}
    return {}


def serve(memory_mb: int = 0) -> None:
    """The worker loop: until stdin closes (the engine stopped or died), answer each request.

    stdout is kept for answers only (anything a library prints goes to stderr), the
    process runs at a lower CPU priority than the engine, and ``memory_mb`` caps its
    address space so one message ends in MemoryError rather than in the kernel's OOM killer.
    """
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    try:
        os.nice(5)
    except OSError:
        pass
    if memory_mb > 0:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import hl7apy.parser  # noqa: F401 - loaded before the first request, not during its budget

    while True:
        head = _read_exact(inp, 5)
        if head is None or head[:1] not in _LEVELS:
            return
        payload = _read_exact(inp, int.from_bytes(head[1:5], "big"))
        if payload is None:
            return
        body = json.dumps(answer(_LEVELS[head[:1]], payload)).encode()
        out.write(len(body).to_bytes(4, "big") + body)
        out.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
