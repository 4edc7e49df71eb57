"""DIMSE command sets (PS3.7 9.3, Implicit VR Little Endian, group 0000) for the storage
Upper Layer: reading a C-STORE-RQ / C-ECHO-RQ and writing their responses.

Written by hand rather than through pydicom because a command set is a dozen fixed
elements and a pydicom round trip cost more per instance than the rest of the
command handling; tests decode what we write with pydicom.
"""

from __future__ import annotations

import struct

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP, C_CANCEL_RQ = 0x0001, 0x8001, 0x0030, 0x8030, 0x0FFF
NO_DATA_SET = 0x0101  # (0000,0800) Command Data Set Type: no data set follows


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
