"""`dicom_map`: DICOM in, DICOM out, changed by declarative rules (docs/mappings.md).

Attributes by keyword, tag or private creator, sequences item by item, lookups
through the config's code tables (StationName -> InstitutionalDepartmentName), and
UIDs regenerated consistently: a new UID is an HMAC of the old one under the engine's
own key, so every instance of a study gets the same new StudyInstanceUID and
references between instances stay intact. The pixel data passes through untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from engine.components import ComponentConfig
from engine.envelope import Envelope
from engine.mapping.base import MappingError, RuleError
from engine.mapping.dicom import DICOM, DicomDocument
from engine.mapping.interpreter import RunContext, check_rules, compile_rules
from engine.mapping.rules import RuleList
from engine.mapping.tables import Table, tables_of
from engine.registry import component
from transforms.deid_dicom import TooDeep, read, write
from transforms.hl7_map import UID_KEY

HEADER_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")


class DicomMapConfig(ComponentConfig):
    """Change DICOM data sets with rules: set, copy, delete, add, lookup, when, foreach, regenerate_uids."""

    type: Literal["dicom_map"] = Field(description="Component type.")
    rules: RuleList = Field(description="Rules applied in order; see docs/mappings.md.")

    def rule_problems(self, tables: dict[str, Table | None]) -> list[RuleError]:
        return [RuleError(("rules", *e.loc), e.message) for e in check_rules(self.rules, DICOM, tables)]


@component("transform", "dicom_map", config=DicomMapConfig, kinds=("dicom",))
def build(config: DicomMapConfig, ctx: Any = None) -> Callable[[Envelope], Envelope]:
    """Change DICOM data sets with declarative rules (keywords, tags, private tags by creator, sequences, UIDs)."""
    program = compile_rules(config.rules, DICOM, tables_of(ctx))
    secret = ctx.keyring.hmac_key(UID_KEY) if program.needs_uid_key and ctx is not None else b""

    def transform(env: Envelope) -> Envelope:
        try:
            ds = read(env.payload)
        except TooDeep as e:
            raise MappingError(str(e)) from None
        program.run(DicomDocument(ds), RunContext(uid_secret=secret))
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if meta is not None and "SOPClassUID" in ds:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
        headers = dict(env.headers)
        for kw in HEADER_KEYWORDS:
            if kw in headers and kw in ds:
                headers[kw] = str(ds.get(kw))
        return env.derive(payload=write(ds), headers=headers)

    return transform
