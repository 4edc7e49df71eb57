"""Code tables and Z-segment extensions for the converters, on the mapping engine.

A converter's own mapping stays hand-written; what a site adds on top is declarative and
runs through the same rule engine as `hl7_map`, `dicom_map` and `fhir_map` (engine/mapping):
``code_tables`` become ``lookup`` rules on the converter's output, compiled once, checked by
`medrelay check` and behaving the same (per occurrence, unknown codes kept). One key per
output kind says where the code sits:

- FHIR (``hl7_to_fhir``) ``{Observation.code: lab-codes}``: in every such CodeableConcept, the
  first coding whose code is in the table gets a coding added from its row (``target_system``,
  ``target_code``, ``target_display``): OBX-3 local codes -> LOINC next to the lab's own.
- HL7 v2 (``dicom_to_hl7``) ``{OBR-4: procedures}``: a CE/CWE field of every such segment; its
  components 1-3 become ``target_code``, ``target_display``, ``target_system`` (an HL7 coding
  system such as LN or RADLEX), as far as the table has these columns.
- DICOM (``hl7_to_worklist``) ``{RequestedProcedureCodeSequence: procedures}``: a code sequence;
  CodeValue, CodeMeaning, CodingSchemeDesignator of every item, from the same columns.

And for ``hl7_to_fhir``: ``extensions: [{from: ZPI-2, resource: Patient, url: ...}]``: a
Z-segment field of the HL7 message becomes a ``valueString`` extension on every resource of
that type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.mapping.base import EMPTY_SCOPE, Kind, RuleError
from engine.mapping.dicom import DICOM, DicomDocument
from engine.mapping.fhir import FHIR, FhirDocument, is_resource_type
from engine.mapping.hl7 import HL7, Hl7Document
from engine.mapping.interpreter import Program, check_rules, compile_rules
from engine.mapping.tables import Table
from transforms.hl7_text import decode_hl7


class ExtensionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: str = Field(alias="from", description="HL7 position to read (a Z-segment field, e.g. ZPI-2)")
    resource: str = Field(description="FHIR resource type that gets the extension, e.g. Patient")
    url: str = Field(description="the extension's url (StructureDefinition canonical)")


CODE_COLUMNS = ("target_code", "target_display", "target_system")
_HL7_PARTS = (1, 2, 3)  # CE / CWE: identifier, text, name of coding system
_DICOM_PARTS = ("CodeValue", "CodeMeaning", "CodingSchemeDesignator")


def _columns(tables: dict[str, Table | None], name: str) -> tuple[str, ...]:
    """The target columns the table has (all three when it is unknown or failed to load: check says why)."""
    t = tables.get(name)
    return tuple(c for c in CODE_COLUMNS if c in t.columns) if t is not None else CODE_COLUMNS


def _fhir_lookups(code_tables: dict[str, str], tables: dict[str, Table | None]) -> list[dict[str, Any]]:
    return [{"lookup": {"field": f"{element}.coding.code", "table": table,
                        "add": {f"{element}.coding": {"system": "target_system", "code": "target_code",
                                                      "display": "target_display"}}}}
            for element, table in code_tables.items()]


def _hl7_lookups(code_tables: dict[str, str], tables: dict[str, Table | None]) -> list[dict[str, Any]]:
    out = []
    for position, table in code_tables.items():
        cols = _columns(tables, table)
        out.append({"lookup": {"field": f"{position}.1", "table": table, "set": {
            f"{position}.{n}": col for n, col in zip(_HL7_PARTS, CODE_COLUMNS, strict=True) if col in cols}}})
    return out


def _dicom_lookups(code_tables: dict[str, str], tables: dict[str, Table | None]) -> list[dict[str, Any]]:
    out = []
    for sequence, table in code_tables.items():
        cols = _columns(tables, table)
        out.append({"lookup": {"field": f"{sequence}.CodeValue", "table": table, "set": {
            f"{sequence}.{kw}": col for kw, col in zip(_DICOM_PARTS, CODE_COLUMNS, strict=True) if col in cols}}})
    return out


_KINDS: dict[str, tuple[Kind, Callable[[dict[str, str], dict[str, Table | None]], list[dict[str, Any]]]]] = {
    "fhir": (FHIR, _fhir_lookups), "hl7v2": (HL7, _hl7_lookups), "dicom": (DICOM, _dicom_lookups)}


def _key_problem(kind: str, key: str) -> str | None:
    """A code_tables key that is not a place for a code of this output kind."""
    if kind == "hl7v2":
        try:
            p = HL7.compile_path(key)
        except ValueError as e:
            return str(e)
        if p.is_segment or p.component or p.repetition is not None:
            return f"{key}: name a coded field (CE/CWE) such as OBR-4, without component or repetition"
    if kind == "dicom":
        try:
            p = DICOM.compile_path(key)
        except ValueError as e:
            return str(e)
        if len(p.steps) != 1 or p.steps[0].vr != "SQ" or p.steps[0].index is not None:
            return f"{key}: name a code sequence such as RequestedProcedureCodeSequence"
    return None


def code_table_problems(kind: str, code_tables: dict[str, str], tables: dict[str, Table | None]) -> list[RuleError]:
    """`medrelay check` for a converter's ``code_tables`` (``kind``: the converter's output kind)."""
    grammar, rules_of = _KINDS[kind]
    out = []
    good = {}
    for key, table in code_tables.items():
        bad = _key_problem(kind, key)
        if bad:
            out.append(RuleError(("code_tables", key), bad))
        else:
            good[key] = table
    keys = list(good)
    for e in check_rules(rules_of(good, tables), grammar, tables):
        key = keys[e.loc[0]] if e.loc and isinstance(e.loc[0], int) else ""
        out.append(RuleError(("code_tables", key), e.message))
    return out


def code_table_program(kind: str, code_tables: dict[str, str], tables: dict[str, Table | None]) -> Program | None:
    """The lookups of ``code_tables`` compiled for the converter's output (None: no tables configured)."""
    if not code_tables:
        return None
    grammar, rules_of = _KINDS[kind]
    return compile_rules(rules_of(code_tables, tables), grammar, tables)


def apply_hl7(program: Program | None, text: str) -> str:
    """Run the code tables on an HL7 v2 message text (segments no lookup touches stay as they are)."""
    if program is None:
        return text
    doc = Hl7Document(text)
    program.run(doc)
    return doc.text()


def apply_dicom(program: Program | None, ds: Any) -> None:
    """Run the code tables on a pydicom Dataset in place."""
    if program is not None:
        program.run(DicomDocument(ds))


def problems(code_tables: dict[str, str], extensions: list[ExtensionSpec],
             tables: dict[str, Table | None]) -> list[RuleError]:
    """What `medrelay check` reports: unknown elements or tables, bad HL7 positions, unknown resource types."""
    out = code_table_problems("fhir", code_tables, tables)
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
    program = code_table_program("fhir", code_tables, tables)
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
