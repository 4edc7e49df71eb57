"""DIMSE command sets (PS3.7 9.3, Implicit VR Little Endian, group 0000) for the storage
Upper Layer: reading a C-STORE-RQ / C-ECHO-RQ and writing their responses.

Written by hand rather than through pydicom because a command set is a dozen fixed
elements and a pydicom round trip cost more per instance than the rest of the
command handling; tests decode what we write with pydicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from engine.store.dicom.intake_check import valid_uid
from listeners.dicom_status import STORE

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP, C_CANCEL_RQ = 0x0001, 0x8001, 0x0030, 0x8030, 0x0FFF
NO_DATA_SET = 0x0101  # (0000,0800) Command Data Set Type: no data set follows
COMMAND_FIELD, MESSAGE_ID, DATA_SET_TYPE = 0x00000100, 0x00000110, 0x00000800
AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE = 0x00000002, 0x00001000
MAX_COMMAND = 64 * 1024  # a C-STORE-RQ command set is ~200 bytes; a longer one is not a command
# A-ABORT reasons (PS3.8 9.3.8, service-provider source) for what a command can get wrong
UNEXPECTED_PDU, INVALID_PARAMETER = 0x02, 0x06

def decode_command(data: bytes) -> dict[int, bytes]:
    """Element tag (as 0xGGGGEEEE) to raw value; raises ValueError on a malformed set."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise ValueError("truncated command element")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if pos + length > end:
            raise ValueError("command element longer than the command set")
        out[(group << 16) | elem] = bytes(data[pos:pos + length])
        pos += length
    return out


def us(cmd: dict[int, bytes], tag: int) -> int | None:
    v = cmd.get(tag)
    return struct.unpack("<H", v)[0] if v is not None and len(v) == 2 else None


def ui(cmd: dict[int, bytes], tag: int) -> str:
    v = cmd.get(tag)
    return v.rstrip(b"\x00 ").decode("ascii", "replace") if v else ""


def element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def ui_value(uid: str) -> bytes:
    b = uid.encode("ascii")
    return b + b"\x00" if len(b) % 2 else b


def encode_response(field: int, message_id: int, sop_class: str, status: int, *,
                    sop_uid: str | None = None, comment: str | None = None) -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP command set (PS3.7 9.3.1.2, 9.3.5.2), elements in tag order."""
    body = [element(0x00000002, ui_value(sop_class)), element(0x00000100, struct.pack("<H", field)),
            element(0x00000120, struct.pack("<H", message_id)),
            element(0x00000800, struct.pack("<H", NO_DATA_SET)), element(0x00000900, struct.pack("<H", status))]
    if comment:
        text = comment[:64].encode("ascii", "replace")
        body.append(element(0x00000902, text + b" " if len(text) % 2 else text))
    if sop_uid is not None:
        body.append(element(0x00001000, ui_value(sop_uid)))
    rest = b"".join(body)
    return element(0x00000000, struct.pack("<I", len(rest))) + rest


@dataclass(frozen=True)
class StoreRefusal:
    """A C-STORE-RQ that is not stored: answered with ``status`` (and ``detail`` as Error
    Comment) after its data set, or, when ``abort`` is set, with an A-ABORT of that reason
    (no Message ID to answer, no data set to store: PS3.7 9.3.1.1 makes both mandatory)."""

    detail: str
    status: int = 0
    abort: int = 0


def check_store_rq(cmd: dict[int, bytes], context_syntax: str) -> StoreRefusal | None:
    """The one check of a C-STORE-RQ command set, for both association paths.

    medrelay's Upper Layer and the pynetdicom associations (``listeners/dicom_provider.py``)
    call it before anything is stored, so the same request gets the same answer on both;
    pynetdicom alone would drop a request with an empty Affected SOP Instance UID without
    answering and abort on one longer than 64 characters.
    """
    if us(cmd, MESSAGE_ID) is None:
        return StoreRefusal("C-STORE-RQ without Message ID", abort=INVALID_PARAMETER)
    if us(cmd, DATA_SET_TYPE) in (None, NO_DATA_SET):
        return StoreRefusal("C-STORE-RQ without a data set", abort=UNEXPECTED_PDU)
    sop_class, sop_uid = ui(cmd, AFFECTED_SOP_CLASS), ui(cmd, AFFECTED_SOP_INSTANCE)
    if not valid_uid(sop_class) or not valid_uid(sop_uid):
        return StoreRefusal("invalid Affected SOP Class/Instance UID", status=STORE["mismatch"].code)
    if sop_class != context_syntax:
        return StoreRefusal("Affected SOP Class UID differs from the presentation context",
                            status=STORE["mismatch"].code)
    return None


def store_response(cmd: dict[int, bytes], status: int, comment: str | None) -> bytes:
    """The C-STORE-RSP to ``cmd``; the Affected SOP Instance UID is echoed only when it is valid
    (it is U(=) in PS3.7 9.3.1.2, and a malformed one would make the response malformed too)."""
    sop_class, sop_uid = ui(cmd, AFFECTED_SOP_CLASS), ui(cmd, AFFECTED_SOP_INSTANCE)
    return encode_response(C_STORE_RSP, us(cmd, MESSAGE_ID) or 0, sop_class if valid_uid(sop_class) else "",
                           status, sop_uid=sop_uid if valid_uid(sop_uid) else None, comment=comment)
