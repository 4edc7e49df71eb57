"""What the interpreter needs of a kind (HL7 v2, DICOM, FHIR): its paths and its document.

The interpreter is written once against these two protocols; each kind module
(``hl7``, ``dicom``, ``fhir``) implements them. A *group* is what a rule can be
repeated over: an HL7 segment name, a DICOM sequence, a FHIR resource type. A
*scope* maps group names to the one occurrence a rule is working on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

Scope = Mapping[str, Any]
EMPTY_SCOPE: Scope = {}


class RuleError(ValueError):
    """A rule that cannot be compiled; ``loc`` is its path inside the rule list."""

    def __init__(self, loc: tuple[Any, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


class MappingError(Exception):
    """A mapping that cannot be applied to this message (``missing: error``, a bad value).

    The route dead-letters the message with this text, which is stored in clear: it
    must name positions and codes, never patient data.
    """


class Path(Protocol):
    text: str

    @property
    def group(self) -> str | None:
        """The group this path reads or writes when it names no occurrence (None: not repeatable)."""


class Kind(Protocol):
    """The path grammar of one kind of message."""

    name: str

    def compile_path(self, text: str, *, write: bool = False) -> Path:
        """Parse and check a path; ``ValueError`` with a reason a person can act on."""

    def group_path(self, text: str) -> str:
        """Check the argument of ``foreach:`` and return the group name."""

    def phi_path(self, path: Path) -> bool:
        """Whether values at this path may identify a patient (kept out of error texts)."""


class Document(Protocol):
    """One message, parsed once, changed by the rules, serialised once."""

    def values(self, path: Any, scope: Scope) -> list[Any]:
        """Every value at ``path`` (all occurrences and repetitions it does not pin down)."""

    def value(self, path: Any, scope: Scope) -> str:
        """The first value at ``path`` as text, '' when absent."""

    def write(self, path: Any, value: Any, scope: Scope) -> None:
        """Set ``path`` (creating what is missing) in every occurrence it names."""

    def add(self, path: Any, value: Any, scope: Scope) -> None:
        """Append ``value`` as a new repetition / list item / sequence item at ``path``."""

    def remove(self, path: Any, scope: Scope) -> None:
        """Delete what ``path`` names (segments, fields, elements, list items)."""

    def copy(self, source: Any, target: Any, scope: Scope) -> None:
        """Copy ``source`` to ``target`` keeping its structure."""

    def occurrences(self, group: str, scope: Scope) -> Iterable[Any]:
        """The occurrences of ``group`` a ``foreach`` walks (a snapshot: rules may delete)."""
