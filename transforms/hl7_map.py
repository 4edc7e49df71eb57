"""`hl7_map`: HL7 v2 in, HL7 v2 out, changed by declarative rules (docs/mappings.md).

The rules are compiled once when the route is built (engine/mapping/interpreter.py);
per message the text is decoded with its MSH-18 charset, split once into segments and
raw fields (engine/mapping/hl7.py), every rule applied, and joined once. Untouched
segments leave byte for byte as they came, with the sender's segment terminator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from engine.components import ComponentConfig
from engine.envelope import Envelope
from engine.hl7.message import HL7Error, read_header
from engine.mapping.base import MappingError, RuleError
from engine.mapping.hl7 import HL7, Hl7Document
from engine.mapping.interpreter import RunContext, check_rules, compile_rules
from engine.mapping.rules import RuleList
from engine.mapping.tables import Table, tables_of
from engine.registry import component

UID_KEY = "mapping"  # keyring secret for regenerate_uids, shared by the three *_map transforms


class Hl7MapConfig(ComponentConfig):
    """Change HL7 v2 messages with rules: set, copy, delete, add, lookup (code tables), when, foreach, drop."""

    type: Literal["hl7_map"] = Field(description="Component type.")
    rules: RuleList = Field(description="Rules applied in order; see docs/mappings.md. In a `when:` a field "
                            "position without a component reads its first component (`MSH-9: ORU` is true "
                            "for ORU^R01; name `MSH-9.2` for the trigger).")
    validate_output: bool = Field(False, description="Check the result with hl7apy (structure, types, lengths) "
                                  "and dead-letter it when it does not conform.")

    def rule_problems(self, tables: dict[str, Table | None]) -> list[RuleError]:
        """What `medrelay check` reports about the rules (positions, tables, operators)."""
        return [RuleError(("rules", *e.loc), e.message) for e in check_rules(self.rules, HL7, tables)]


def _codec(payload: bytes) -> tuple[str, str]:
    """(decode codec, encode codec): without MSH-18 an ASCII message may take UTF-8 values."""
    try:
        h = read_header(payload, require=False)
    except HL7Error as e:
        raise MappingError(f"unreadable HL7 header: {e.text}") from None
    return h.codec, ("utf-8" if h.codec == "ascii" and not h.charset else h.codec)


def apply_hl7(program: Any, payload: bytes, ctx: RunContext) -> bytes:
    """Run a compiled program on one message's bytes; the changed message's bytes."""
    decode, encode = _codec(payload)
    try:
        text = payload.decode(decode)
    except UnicodeDecodeError as e:
        raise MappingError(f"message bytes are not valid {decode} (offset {e.start})") from None
    doc = Hl7Document(text)
    program.run(doc, ctx)
    try:
        return doc.text().encode(encode)
    except UnicodeEncodeError as e:
        raise MappingError(f"a mapped value cannot be written in the message's character set {encode} "
                           f"(set MSH-18 to UNICODE UTF-8?), offset {e.start}") from None


@component("transform", "hl7_map", config=Hl7MapConfig, kinds=("hl7v2",))
def build(config: Hl7MapConfig, ctx: Any = None) -> Callable[[Envelope], Envelope]:
    """Change HL7 v2 messages with declarative rules (set, copy, delete, add, lookup, when, foreach, drop)."""
    program = compile_rules(config.rules, HL7, tables_of(ctx))
    secret = ctx.keyring.hmac_key(UID_KEY) if program.needs_uid_key and ctx is not None else b""
    validate = config.validate_output

    def transform(env: Envelope) -> Envelope:
        out = apply_hl7(program, env.payload, RunContext(uid_secret=secret))
        if validate:
            _validate(out)
        headers = dict(env.headers)
        try:
            headers.update(read_header(out, require=False).as_headers())
        except HL7Error:
            pass
        return env.derive(payload=out, headers=headers)

    return transform


def _validate(payload: bytes) -> None:
    from transforms.hl7_text import V2Message
    from transforms.hl7_validate import validate_v2

    msg = V2Message.from_bytes(payload)
    structure = msg.msh.get(9, 3) or "_".join(msg.message_type)
    validate_v2(msg.text, structure, msg.version or "2.5.1")
