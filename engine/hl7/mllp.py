"""MLLP (HL7 v2 Minimal Lower Layer Protocol) framing, without I/O.

A frame is ``<VT 0x0B> payload <FS 0x1C> <CR 0x0D>``. TCP gives us arbitrary
chunks, so one read may hold half a frame or three frames; ``FrameParser.feed``
takes whatever arrived and returns complete events in order. Keeping it free of
sockets lets the tricky cases (split end markers, oversized frames, junk between
frames) be unit-tested byte by byte, and lets the listener and the sender share it.

Tolerances, chosen after what deployed senders do:
- whitespace and NUL between frames are ignored (some senders add LF after CR);
- ``FS`` not followed by ``CR`` still ends the frame (the next byte is treated as
  outside a frame), so a sender that omits the CR is not left waiting for an ACK;
- a ``VT`` inside a frame restarts the frame: the sender gave up on the previous
  one mid-way (reconnect logic in some engines) and will resend it. A run of start
  blocks with nothing between them is one start (nothing was dropped: no event), and
  the restarts one chunk holds are one ``Restarted`` event with their count, so a peer
  streaming ``VT`` bytes costs a few C-level scans per chunk, not an event per byte;
  past ``max_restarts`` start blocks inside frames without a frame completed the
  parser reports ``Unframed`` (the peer is not speaking MLLP: disconnect it).
Other bytes outside a frame mean the peer is not speaking MLLP: ``Unframed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

START_BLOCK = 0x0B
END_BLOCK = 0x1C
CARRIAGE_RETURN = 0x0D
SB = b"\x0b"
EB = b"\x1c"
CR = b"\x0d"
_BLANKS = re.compile(rb"[ \t\r\n\x00]*")  # skipped between frames, in one C-level match
MAX_RESTARTS = 100  # start blocks inside frames, without a frame completed, before Unframed


def frame(payload: bytes) -> bytes:
    """Wrap one message in MLLP start and end blocks."""
    return SB + payload + EB + CR


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete message as received, without the MLLP envelope."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Oversized:
    """A frame longer than the limit. ``prefix`` holds its first bytes (enough for the MSH)
    so the receiver can still address its rejection to the right control id."""

    prefix: bytes
    size: int


@dataclass(frozen=True, slots=True)
class Unframed:
    """Bytes outside any frame that are not blank, a frame that never ends (past
    ``max_discard_bytes``) or more than ``max_restarts`` restarts without a frame completed
    (``restarts`` then says how many): the peer does not speak MLLP."""

    sample_size: int
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class Restarted:
    """Start blocks arrived inside a frame; the unfinished frame(s), ``dropped`` bytes in all
    (start blocks not counted), were dropped. ``restarts``: the start blocks in one chunk that
    this event stands for (a run of them with nothing between gives no event at all)."""

    dropped: int
    restarts: int = 1


Event = Frame | Oversized | Unframed | Restarted


class FrameParser:
    """Incremental MLLP de-framer with a size limit.

    ``max_frame_bytes`` bounds memory per connection: past it the parser keeps
    only ``prefix_bytes`` and discards the rest of the frame until its end block,
    then reports ``Oversized`` so the receiver can answer and carry on in sync.
    ``max_discard_bytes`` bounds how long it keeps discarding: a peer streaming
    without ever ending a frame gets ``Unframed`` and should be disconnected.
    ``max_restarts`` bounds the start blocks seen inside frames since the last complete
    frame (None: no bound); past it, ``Unframed`` too.
    """

    def __init__(self, max_frame_bytes: int = 10 * 1024 * 1024, *, prefix_bytes: int = 4096,
                 max_discard_bytes: int | None = None, max_restarts: int | None = MAX_RESTARTS) -> None:
        if max_frame_bytes < 16:
            raise ValueError("max_frame_bytes must be at least 16")
        self.max_frame_bytes = max_frame_bytes
        self.prefix_bytes = prefix_bytes
        self.max_discard_bytes = max_discard_bytes if max_discard_bytes is not None \
            else max(4 * max_frame_bytes, 64 * 1024 * 1024)
        self._buf = bytearray()
        self._in_frame = False
        self._discarding = False
        self._discarded = 0
        self._prefix = b""
        self._started = 0
        self._restarts = 0  # start blocks inside frames since the last complete frame
        self.max_restarts = max_restarts

    @property
    def frames_started(self) -> int:
        """Start blocks seen so far: lets a reader time each frame from its own start
        (a frame timeout), even when one chunk ends a frame and begins the next."""
        return self._started

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame (0 between frames)."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        return self._in_frame

    def feed(self, data: bytes) -> list[Event]:
        """Consume one chunk from the socket; returns the events it completes, in order."""
        events: list[Event] = []
        pos = 0
        n = len(data)
        while pos < n:
            if not self._in_frame:
                # Outside a frame: skip blanks, expect a start block.
                m = _BLANKS.match(data, pos)
                pos = m.end() if m else pos
                if pos >= n:
                    break
                if data[pos] != START_BLOCK:
                    sb = data.find(SB, pos)
                    junk = (n if sb < 0 else sb) - pos
                    events.append(Unframed(junk))
                    if sb < 0:
                        break
                    pos = sb
                self._start_frame()
                pos += 1
                continue
            if self._discarding:
                end = data.find(EB, pos)
                sb = data.find(SB, pos)
                if sb >= 0 and (end < 0 or sb < end):
                    events.append(Oversized(self._prefix, self._discarded + (sb - pos)))
                    self._in_frame = False
                    self._discarding = False
                    pos = sb
                    continue
                if end < 0:
                    self._discarded += n - pos
                    if self._discarded > self.max_discard_bytes:
                        events.append(Unframed(self._discarded))
                        self._discarding = False
                        self._in_frame = False
                    break
                self._discarded += end - pos
                events.append(Oversized(self._prefix, self._discarded))
                self._in_frame = False
                self._discarding = False
                pos = end + 1
                continue
            # Inside a frame: look for the end block (or a restart) in the new bytes only.
            end = data.find(EB, pos)
            stop = n if end < 0 else end
            last = data.rfind(SB, pos, stop)
            if last >= 0:
                # Every start block before the end block (or the chunk's end) restarts the frame:
                # the frame begins after the last one; what was before it is dropped, at once.
                starts = data.count(SB, pos, last + 1)
                dropped = len(self._buf) + (last + 1 - pos) - starts
                self._buf.clear()
                self._restarts += starts
                pos = last + 1
                if dropped:
                    self._started += 1
                    prev = events[-1] if events else None
                    if isinstance(prev, Restarted):  # one event per chunk between two frames
                        events[-1] = Restarted(prev.dropped + dropped, prev.restarts + starts)
                    else:
                        events.append(Restarted(dropped, starts))
                if self.max_restarts is not None and self._restarts > self.max_restarts:
                    events.append(Unframed(dropped, restarts=self._restarts))
                    self._in_frame = False
                    self._restarts = 0
                    break  # the peer is not speaking MLLP: the rest of the chunk is not read
                continue
            room = self.max_frame_bytes - len(self._buf)
            if stop - pos > room:
                self._buf += data[pos:pos + room]
                self._prefix = bytes(self._buf[:self.prefix_bytes])
                self._discarded = len(self._buf)
                self._buf.clear()
                self._discarding = True
                pos += room
                continue
            self._buf += data[pos:stop]
            if end < 0:
                break
            events.append(Frame(bytes(self._buf)))
            self._restarts = 0
            self._buf.clear()
            self._in_frame = False
            pos = end + 1
        return events

    def _start_frame(self) -> None:
        self._started += 1
        self._in_frame = True
        self._buf.clear()
        self._discarding = False
        self._discarded = 0
        self._prefix = b""
