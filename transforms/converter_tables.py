"""Code tables and Z-segment extensions for the converters (hl7_to_fhir), on the mapping engine.

A converter's own mapping stays hand-written; what a site adds on top is declarative and
runs through the same rule engine as `fhir_map` (engine/mapping), so it is checked by
`medrelay check` and behaves the same:

- ``code_tables: {Observation.code: lab-codes}``: in every such CodeableConcept, the first
  coding whose code is in the table gets a coding added from its row (``target_system``,
  ``target_code``, ``target_display``): OBX-3 local codes -> LOINC next to the lab's own.
- ``extensions: [{from: ZPI-2, resource: Patient, url: ...}]``: a Z-segment field of the HL7
  message becomes a ``valueString`` extension on every resource of that type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.mapping.base import EMPTY_SCOPE, RuleError
from engine.mapping.fhir import FHIR, FhirDocument, is_resource_type
from engine.mapping.hl7 import HL7, Hl7Document
from engine.mapping.interpreter import check_rules, compile_rules
from engine.mapping.tables import Table
from transforms.hl7_text import decode_hl7


class ExtensionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: str = Field(alias="from", description="HL7 position to read (a Z-segment field, e.g. ZPI-2)")
    resource: str = Field(description="FHIR resource type that gets the extension, e.g. Patient")
    url: str = Field(description="the extension's url (StructureDefinition canonical)")


def _lookups(code_tables: dict[str, str]) -> list[dict[str, Any]]:
    return [{"lookup": {"field": f"{element}.coding.code", "table": table,
                        "add": {f"{element}.coding": {"system": "target_system", "code": "target_code",
                                                      "display": "target_display"}}}}
            for element, table in code_tables.items()]


def problems(code_tables: dict[str, str], extensions: list[ExtensionSpec],
             tables: dict[str, Table | None]) -> list[RuleError]:
    """What `medrelay check` reports: unknown elements or tables, bad HL7 positions, unknown resource types."""
    out = []
    elements = list(code_tables)
    for e in check_rules(_lookups(code_tables), FHIR, tables):
        element = elements[e.loc[0]] if e.loc and isinstance(e.loc[0], int) else ""
        out.append(RuleError(("code_tables", element), e.message))
    for j, ext in enumerate(extensions):
        try:
            HL7.compile_path(ext.from_)
        except ValueError as err:
            out.append(RuleError(("extensions", j, "from"), str(err)))
        if not is_resource_type(ext.resource):
            out.append(RuleError(("extensions", j, "resource"), f"{ext.resource!r} is not a FHIR R4 resource type"))
    return out


def build_post(code_tables: dict[str, str], extensions: list[ExtensionSpec],
               tables: dict[str, Table | None]) -> Callable[[bytes, dict[str, Any]], None] | None:
    """A function that adds codings and extensions to a converted Bundle in place (None: nothing to do)."""
    if not code_tables and not extensions:
        return None
    program = compile_rules(_lookups(code_tables), FHIR, tables) if code_tables else None
    exts = [(HL7.compile_path(x.from_), FHIR.compile_path(f"{x.resource}.extension", write=True), x.url)
            for x in extensions]

    def post(payload: bytes, bundle: dict[str, Any]) -> None:
        doc = FhirDocument(bundle)
        if program is not None:
            program.run(doc)
        if exts:
            msg = Hl7Document(decode_hl7(payload))
            for src, target, url in exts:
                value = msg.value(src, EMPTY_SCOPE)
                if value:
                    doc.add(target, {"url": url, "valueString": value}, EMPTY_SCOPE)

    return post
