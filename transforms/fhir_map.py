"""`fhir_map`: FHIR in, FHIR out, changed by declarative rules (docs/mappings.md).

Paths start with a resource type and apply to each resource of that type, alone or in
a Bundle; reading is FHIRPath (fhirpathpy), writing takes element names, ``[n]`` and
``where(field='value')``. A code lookup can add a coding next to the local one (the
translation FHIR expects, rather than replacing what the sender said). The result is
validated with fhir.resources before it leaves, as the converters do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, ValidationError

from engine.components import ComponentConfig
from engine.envelope import Envelope
from engine.mapping.base import MappingError, RuleError
from engine.mapping.fhir import FHIR, FhirDocument, validate
from engine.mapping.interpreter import RunContext, check_rules, compile_rules
from engine.mapping.rules import RuleList
from engine.mapping.tables import Table, tables_of
from engine.registry import component
from transforms.hl7_map import UID_KEY


class FhirMapConfig(ComponentConfig):
    """Change FHIR resources and Bundles with rules: set, copy, delete, add, lookup (add a coding), when."""

    type: Literal["fhir_map"] = Field(description="Component type.")
    rules: RuleList = Field(description="Rules applied in order; see docs/mappings.md.")
    validate_output: bool = Field(True, description="Validate the result with fhir.resources (R4B) and "
                                  "dead-letter it when it does not conform.")

    def rule_problems(self, tables: dict[str, Table | None]) -> list[RuleError]:
        return [RuleError(("rules", *e.loc), e.message) for e in check_rules(self.rules, FHIR, tables)]


@component("transform", "fhir_map", config=FhirMapConfig, kinds=("fhir",))
def build(config: FhirMapConfig, ctx: Any = None) -> Callable[[Envelope], Envelope]:
    """Change FHIR resources and Bundles with declarative rules (FHIRPath selection, code lookups adding codings)."""
    program = compile_rules(config.rules, FHIR, tables_of(ctx))
    secret = ctx.keyring.hmac_key(UID_KEY) if program.needs_uid_key and ctx is not None else b""
    check = config.validate_output

    def transform(env: Envelope) -> Envelope:
        doc = FhirDocument.from_bytes(env.payload)
        program.run(doc, RunContext(uid_secret=secret))
        if check:
            _check_structure(doc.root)
            try:
                validate(doc.root)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                raise MappingError(f"the mapped {doc.root.get('resourceType')} is not valid FHIR R4: "
                                   f"{where}: {first['msg']}") from None
        return env.derive(payload=doc.to_bytes())

    return transform


def _check_structure(root: dict[str, Any]) -> None:
    """The FHIR store's own structure pass (required bindings, shapes) on the mapped result.

    fhir.resources never enforces a required binding (`Observation.status: notastatus`
    passes it), so without this pass a rule's output passed here and was refused by the
    FHIR store or a FHIR server later. Issues name the element, never its value.
    """
    from engine.store.fhir import structure

    rtype = str(root.get("resourceType"))
    if not structure.known_resource_type(rtype):
        return
    problems = structure.check(root, rtype)
    if problems:
        first = problems[0]
        raise MappingError(f"the mapped {rtype} is not valid FHIR R4: {first.diagnostics}")
