"""Check an outgoing HL7 v2 message with hl7apy before it leaves.

hl7apy 1.3.5 validates message structure, segment cardinality, data types and
field lengths (``VALIDATION_LEVEL.STRICT`` + ``validate()``). One known gap: its
v2.5.1 ORM_O01 definition treats the OBR|RQD|RQ1|RXO|ODS|ODT choice group as if every
member were required, so a correct ORM^O01 fails. For that structure only, each
segment is validated strictly on its own instead (fields, types, lengths), which
is as far as hl7apy can go there.
"""

from __future__ import annotations

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message, parse_segment

SEGMENT_ONLY = frozenset({"ORM_O01"})


class HL7ValidationError(ValueError):
    """The message we built does not conform; carries hl7apy's reason."""


def validate_v2(text: str, structure: str, version: str = "2.5.1") -> None:
    """Raise HL7ValidationError unless ``text`` (segments split by CR) conforms."""
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
