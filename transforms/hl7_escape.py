"""HL7 v2 escape sequences (v2.5.1 chapter 2.7), both directions.

``engine.hl7.message`` has the routing-grade pair (delimiters only, newlines flattened to
spaces). Conversions need more: formatted text keeps its line breaks (``\\.br\\``),
hex escapes (``\\Xhh\\``) are decoded and highlighting is stripped, so FHIR gets the
text the sender meant. The ``Delimiters`` type is the engine's own.
The escape character itself is escaped first on the way out and recognised as a
sequence on the way in, so ``\\`` never doubles.
"""

from __future__ import annotations

import re

from engine.hl7.message import Delimiters


def delimiters_of(text: str) -> Delimiters:
    """The delimiters declared by the MSH at the start of ``text`` (defaults when unreadable)."""
    if len(text) < 8 or not text.startswith("MSH"):
        return Delimiters()
    f = text[3]
    enc = text[4:].split(f, 1)[0]
    if len(enc) < 4:
        enc = enc + "^~\\&"[len(enc):]
    return Delimiters(f, enc[0], enc[1], enc[2], enc[3])


DEFAULT = Delimiters()


def escape(value: str, d: Delimiters = DEFAULT) -> str:
    """Escape a plain value for use inside a field, component or subcomponent.

    Line breaks become ``\\.br\\`` (formatted text) so a value cannot end a segment.
    """
    e = d.escape
    out = value.replace(e, f"{e}E{e}")
    out = (out.replace(d.field, f"{e}F{e}").replace(d.component, f"{e}S{e}")
           .replace(d.repetition, f"{e}R{e}").replace(d.subcomponent, f"{e}T{e}"))
    if "\r" in out or "\n" in out:
        out = out.replace("\r\n", "\n").replace("\r", "\n").replace("\n", f"{e}.br{e}")
    return out


_cache: dict[str, re.Pattern[str]] = {}


def _pattern(e: str) -> re.Pattern[str]:
    pat = _cache.get(e)
    if pat is None:
        q = re.escape(e)
        pat = _cache[e] = re.compile(f"{q}([^{q}]*){q}")
    return pat


def unescape(value: str, d: Delimiters = DEFAULT) -> str:
    """Turn escape sequences back into characters.

    ``\\F\\ \\S\\ \\R\\ \\T\\ \\E\\`` give the delimiters, ``\\Xhh..\\`` hex bytes (UTF-8 when
    they form valid UTF-8, else ISO 8859-1), ``\\.br\\`` a newline; highlighting
    (``\\H\\ \\N\\``) and other formatting sequences are dropped. Unknown sequences are
    kept verbatim: losing characters silently would be worse than showing them.
    """
    if d.escape not in value:
        return value
    table = {"F": d.field, "S": d.component, "R": d.repetition, "T": d.subcomponent, "E": d.escape,
             ".br": "\n", "H": "", "N": ""}

    def sub(m: re.Match[str]) -> str:
        code = m.group(1)
        hit = table.get(code)
        if hit is not None:
            return hit
        if code.startswith("X") and len(code) > 1 and len(code) % 2 == 1:
            try:
                raw = bytes.fromhex(code[1:])
            except ValueError:
                return m.group(0)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("latin-1")
        if code.startswith((".sp", ".in", ".ti", ".sk", ".ce", ".fi", ".nf")):
            return "\n" if code.startswith(".sp") else ""
        return m.group(0)

    return _pattern(d.escape).sub(sub, value)
