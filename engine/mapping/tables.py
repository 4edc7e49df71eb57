"""Code tables for ``lookup`` rules and the converters: CSV files, inline values, FHIR ConceptMaps.

Declared once under top-level ``tables:`` in channels.yaml, loaded when the config is
loaded (so `medrelay check` finds a missing file, a missing column or a code listed
twice, and a reload with SIGHUP picks up an edited table) and shared by every route.
A table maps a source code to a row of named columns; a lookup rule writes columns of
the row into the message.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ConceptMap targets that say "this is not a match" (R4 equivalence, R5 relationship).
_NOT_A_MATCH = frozenset({"unmatched", "disjoint", "not-related-to"})
CONCEPTMAP_COLUMNS = ("code", "display", "source_system", "target_code", "target_display", "target_system",
                      "equivalence")
MAX_ROWS = 1_000_000


class TableSpec(BaseModel):
    """One entry of top-level ``tables:``: exactly one of ``file``, ``values``, ``conceptmap``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str | None = Field(None, description="CSV file (UTF-8, header row), relative to the YAML file; "
                             "the `key` column holds the source codes, the others are what lookups write")
    values: dict[str, str | dict[str, str]] | None = Field(
        None, description="inline table: code -> value (column `target_code`) or code -> {column: value}")
    conceptmap: str | None = Field(None, description="FHIR R4/R5 ConceptMap JSON file, relative to the YAML "
                                   "file: columns code, display, source_system, target_code, target_display, "
                                   "target_system, equivalence")
    key: str = Field("code", description="CSV column with the source codes")
    columns: list[str] = Field(default_factory=list, description="CSV columns that must be present "
                               "(`medrelay check` fails without them)")
    ignore_case: bool = Field(False, description="match source codes without regard to case")

    @model_validator(mode="after")
    def _one_source(self) -> TableSpec:
        given = [k for k in ("file", "values", "conceptmap") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a table takes exactly one of file, values, conceptmap"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


class TableError(ValueError):
    """A table that cannot be used; ``attr`` is the key of the spec it is about, ``phase`` for exit codes."""

    def __init__(self, attr: str, message: str, phase: str = "schema") -> None:
        super().__init__(message)
        self.attr = attr
        self.message = message
        self.phase = phase


@dataclass
class Table:
    name: str
    columns: tuple[str, ...]
    rows: dict[str, dict[str, str]]
    ignore_case: bool = False
    default: dict[str, str] | None = None  # ConceptMap `unmapped` mode fixed
    identity: bool = False  # ConceptMap `unmapped` mode provided: an unlisted code maps to itself
    digest: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, code: str) -> dict[str, str] | None:
        """The row of ``code``, or the ConceptMap's unmapped answer, or None."""
        key = code.strip()
        row = self.rows.get(key.upper() if self.ignore_case else key)
        if row is not None:
            return row
        if self.default is not None:
            return self.default
        if self.identity and key:
            return {"code": key, "target_code": key}
        return None


def _read(path: Path, attr: str, limit: int = 64 * 1024 * 1024) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise TableError(attr, f"{path}: {size} bytes is more than a code table may be ({limit})")
        return path.read_bytes()
    except FileNotFoundError:
        raise TableError(attr, f"file not found: {path}", "environment") from None
    except OSError as e:
        raise TableError(attr, f"cannot read {path}: {e.strerror}", "environment") from None


def _add(rows: dict[str, dict[str, str]], code: str, row: dict[str, str], ignore_case: bool,
         dupes: list[str]) -> None:
    key = code.upper() if ignore_case else code
    if key in rows:
        dupes.append(code)
    else:
        rows[key] = row
    if len(rows) > MAX_ROWS:
        raise TableError("file", f"more than {MAX_ROWS} codes")


def _dupes_error(attr: str, dupes: list[str]) -> TableError:
    shown = ", ".join(repr(d) for d in dupes[:5]) + (f" and {len(dupes) - 5} more" if len(dupes) > 5 else "")
    return TableError(attr, f"source code listed more than once: {shown}")


def _csv(name: str, spec: TableSpec, base: Path) -> Table:
    path = _resolve(base, spec.file or "")
    data = _read(path, "file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TableError("file", f"{path}: not UTF-8 (byte {e.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = tuple((h or "").strip() for h in (reader.fieldnames or ()))
    if not header:
        raise TableError("file", f"{path}: empty, expected a header row")
    need = [spec.key, *spec.columns]
    absent = [c for c in need if c not in header]
    if absent:
        raise TableError("file", f"{path}: column{'s' if len(absent) > 1 else ''} {', '.join(absent)} "
                         f"not in the header ({', '.join(header)})")
    reader.fieldnames = list(header)
    rows: dict[str, dict[str, str]] = {}
    dupes: list[str] = []
    for n, raw in enumerate(reader, start=2):
        row = {k: (v or "").strip() for k, v in raw.items() if k is not None and isinstance(v, str | None)}
        code = row.get(spec.key, "")
        if not code:
            raise TableError("file", f"{path}: line {n}: empty {spec.key}")
        _add(rows, code, row, spec.ignore_case, dupes)
    if dupes:
        raise _dupes_error("file", dupes)
    return Table(name, header, rows, spec.ignore_case, digest=hashlib.sha256(data).hexdigest())


def _values(name: str, spec: TableSpec) -> Table:
    rows: dict[str, dict[str, str]] = {}
    columns: list[str] = ["code", "target_code"]
    dupes: list[str] = []
    for code, v in (spec.values or {}).items():
        row = {"code": code, "target_code": v} if isinstance(v, str) else {"code": code, **v}
        for c in row:
            if c not in columns:
                columns.append(c)
        _add(rows, code, row, spec.ignore_case, dupes)
    if dupes:  # only with ignore_case: YAML keys are unique
        raise _dupes_error("values", dupes)
    digest = hashlib.sha256(json.dumps(spec.values, sort_keys=True).encode()).hexdigest()
    return Table(name, tuple(columns), rows, spec.ignore_case, digest=digest)


def _conceptmap(name: str, spec: TableSpec, base: Path) -> Table:
    path = _resolve(base, spec.conceptmap or "")
    data = _read(path, "conceptmap")
    try:
        cm = json.loads(data)
    except ValueError as e:
        raise TableError("conceptmap", f"{path}: not JSON ({e})") from None
    if not isinstance(cm, dict) or cm.get("resourceType") != "ConceptMap":
        raise TableError("conceptmap", f"{path}: not a FHIR ConceptMap (resourceType)")
    rows: dict[str, dict[str, str]] = {}
    dupes: list[str] = []
    default: dict[str, str] | None = None
    identity = False
    for group in cm.get("group") or []:
        if not isinstance(group, dict):
            continue
        source, target = str(group.get("source") or ""), str(group.get("target") or "")
        for el in group.get("element") or []:
            code = str(el.get("code") or "").strip() if isinstance(el, dict) else ""
            if not code:
                continue
            match = next((t for t in el.get("target") or [] if isinstance(t, dict) and t.get("code") and
                          str(t.get("equivalence") or t.get("relationship") or "equivalent") not in _NOT_A_MATCH),
                         None)
            if match is None:
                continue
            _add(rows, code, {"code": code, "display": str(el.get("display") or ""), "source_system": source,
                              "target_code": str(match["code"]), "target_display": str(match.get("display") or ""),
                              "target_system": target,
                              "equivalence": str(match.get("equivalence") or match.get("relationship") or "")},
                 spec.ignore_case, dupes)
        unmapped = group.get("unmapped") or {}
        if isinstance(unmapped, dict):
            if unmapped.get("mode") == "fixed" and unmapped.get("code"):
                default = {"code": "", "target_code": str(unmapped["code"]),
                           "target_display": str(unmapped.get("display") or ""), "target_system": target}
            elif unmapped.get("mode") in ("provided", "use-source-code"):
                identity = True
    if dupes:
        raise _dupes_error("conceptmap", dupes)
    return Table(name, CONCEPTMAP_COLUMNS, rows, spec.ignore_case, default=default, identity=identity,
                 digest=hashlib.sha256(data).hexdigest(), meta={"url": cm.get("url")})


def _resolve(base: Path, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else base / path


def load_table(name: str, spec: TableSpec, base: Path) -> Table:
    """Load one table; ``TableError`` names the spec key at fault."""
    if spec.file is not None:
        return _csv(name, spec, base)
    if spec.values is not None:
        return _values(name, spec)
    return _conceptmap(name, spec, base)


def load_tables(specs: Mapping[str, TableSpec], base: Path) -> tuple[dict[str, Table | None], list[TableError]]:
    """Every table, or None in its place with a TableError (``.name`` set) saying why."""
    tables: dict[str, Table | None] = {}
    errors: list[TableError] = []
    for name, spec in specs.items():
        try:
            tables[name] = load_table(name, spec, base)
        except TableError as e:
            e.table = name  # type: ignore[attr-defined]
            tables[name] = None
            errors.append(e)
    return tables, errors


def digest(tables: Mapping[str, Table | None]) -> str:
    """One hash of every table's content, for the config hash (a changed table is a changed config)."""
    h = hashlib.sha256()
    for name in sorted(tables):
        t = tables[name]
        h.update(f"{name}={t.digest if t else '-'};".encode())
    return h.hexdigest() if tables else ""


def tables_of(ctx: Any) -> dict[str, Table | None]:
    """The tables of the config a component was built from (none without a context)."""
    settings = getattr(ctx, "settings", None)
    return dict(getattr(settings, "tables", None) or {})
