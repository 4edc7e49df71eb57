"""Compile a rule list against one kind, then run it on documents of that kind.

Compiling does all the checking (positions, tables, columns, operators) and turns
every rule into a step, so running is a walk over prepared steps: no parsing of
paths or conditions per message. The same code serves HL7 v2, DICOM and FHIR; what
differs is the ``Kind`` (path grammar) and the ``Document`` (how a path reads and writes).

Repetition: a rule that reads and writes the same repeating group (``lookup`` on
``OBX-3.1`` setting ``OBX-3.*``, ``copy`` from ``OBX-3`` to ``OBX-4``, ``when: {OBX-2: NM}``
with ``then: [set OBX-2]``) runs once per occurrence of that group, as ``foreach`` would;
otherwise a write without an occurrence writes every occurrence, and a read takes the
first (conditions: any).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.envelope import Drop
from engine.mapping.base import EMPTY_SCOPE, Kind, MappingError, RuleError, Scope
from engine.mapping.conditions import Condition, compile_condition
from engine.mapping.rules import (
    AddRule,
    ComputeRule,
    ComputeSpec,
    CopyRule,
    DeleteRule,
    DropRule,
    ErrorRule,
    ForeachRule,
    LookupRule,
    SetRule,
    UidRule,
    WhenRule,
)
from engine.mapping.tables import Table
from engine.mapping.values import InvalidValue, ValueFn, compile_chain, run_chain

UID_ROOT = "2.25."


@dataclass
class RunContext:
    """What a run needs from the transform: the secret that keys regenerated UIDs."""

    uid_secret: bytes = b""
    _uids: dict[str, str] = field(default_factory=dict)

    def uid(self, old: str) -> str:
        """``2.25.<decimal of 128 bits of HMAC(secret, "uid:"+old)>``, at most 44 characters (PS3.5 B.2)."""
        old = old.strip().rstrip("\0")
        if not old:
            return old
        new = self._uids.get(old)
        if new is None:
            if not self.uid_secret:
                raise MappingError("regenerate_uids needs a key (the transform supplies the engine's)")
            digest = hmac.new(self.uid_secret, f"uid:{old}".encode(), hashlib.sha256).digest()
            new = UID_ROOT + str(int.from_bytes(digest[:16], "big"))
            if len(self._uids) < 100_000:
                self._uids[old] = new
        return new


class Step:
    """A compiled rule. ``reads``/``writes``: the repeating groups it touches without naming an occurrence."""

    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()

    def run(self, doc: Any, scope: Scope, ctx: RunContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _groups(paths: Sequence[Any], scoped: frozenset[str]) -> frozenset[str]:
    return frozenset(g for g in (getattr(p, "group", None) for p in paths) if g and g not in scoped)


class _Fn(Step):
    def __init__(self, fn: Callable[[Any, Scope, RunContext], None], reads: Sequence[Any] = (),
                 writes: Sequence[Any] = (), scoped: frozenset[str] = frozenset()) -> None:
        self.fn = fn
        self.reads = _groups(reads, scoped)
        self.writes = _groups(writes, scoped)

    def run(self, doc: Any, scope: Scope, ctx: RunContext) -> None:
        self.fn(doc, scope, ctx)


class _Foreach(Step):
    def __init__(self, group: str, steps: list[Step], *, once_if_none: bool = False) -> None:
        self.group = group
        self.steps = steps
        self.once_if_none = once_if_none  # no occurrence: run once unscoped (a `default` creates the group)
        self.reads = frozenset().union(*(s.reads for s in steps)) - {group}
        self.writes = frozenset().union(*(s.writes for s in steps)) - {group}

    def run(self, doc: Any, scope: Scope, ctx: RunContext) -> None:
        occs = list(doc.occurrences(self.group, scope))
        if not occs and self.once_if_none:
            for s in self.steps:
                s.run(doc, scope, ctx)
            return
        for occ in occs:
            inner = {**scope, **doc.scope_for(self.group, occ)}
            for s in self.steps:
                s.run(doc, inner, ctx)


class _When(Step):
    def __init__(self, cond: Condition, then: list[Step], other: list[Step], scoped: frozenset[str]) -> None:
        self.cond = cond
        self.then = then
        self.other = other
        self.reads = _groups(cond.keys, scoped).union(*(s.reads for s in then + other))
        self.writes = frozenset().union(*(s.writes for s in then + other))

    def run(self, doc: Any, scope: Scope, ctx: RunContext) -> None:
        ok = self.cond.test(lambda p: doc.values(p, scope))
        for s in self.then if ok else self.other:
            s.run(doc, scope, ctx)


def _per_occurrence(step: Step, *, once_if_none: bool = False) -> Step:
    """Wrap a step that reads and writes the same repeating group in a foreach over it."""
    shared = sorted(step.reads & step.writes)
    return _Foreach(shared[0], [step], once_if_none=once_if_none) if shared else step


@dataclass
class Program:
    """A compiled rule list."""

    kind: Kind
    steps: list[Step]
    needs_uid_key: bool = False  # has regenerate_uids: the transform must supply RunContext.uid_secret

    def run(self, doc: Any, ctx: RunContext | None = None) -> None:
        """Apply every rule in order; raises Drop (filtered) or MappingError (dead letter)."""
        c = ctx or RunContext()
        for s in self.steps:
            s.run(doc, EMPTY_SCOPE, c)


class _Compiler:
    def __init__(self, kind: Kind, tables: Mapping[str, Table | None] | None) -> None:
        self.kind = kind
        self.tables = tables
        self.errors: list[RuleError] = []
        self.uids = False

    def path(self, loc: tuple[Any, ...], text: Any, *, write: bool = False) -> Any:
        try:
            return self.kind.compile_path(str(text), write=write)
        except ValueError as e:
            self.errors.append(RuleError(loc, str(e)))
            return None

    def value(self, loc: tuple[Any, ...], p: Any, v: Any) -> None:
        check = getattr(self.kind, "check_value", None)
        if check is not None and p is not None:
            try:
                check(p, v)
            except ValueError as e:
                self.errors.append(RuleError(loc, str(e)))

    def rules(self, rules: Sequence[Any], loc: tuple[Any, ...], scoped: frozenset[str]) -> list[Step]:
        out = []
        for i, r in enumerate(rules):
            step = self.rule(r, (*loc, i), scoped)
            if step is not None:
                out.append(step)
        return out

    def rule(self, r: Any, loc: tuple[Any, ...], scoped: frozenset[str]) -> Step | None:
        if isinstance(r, SetRule):
            pairs = []
            for k, v in r.set.items():
                p = self.path((*loc, "set", k), k, write=True)
                self.value((*loc, "set", k), p, v)
                pairs.append((p, v))

            def do_set(doc: Any, scope: Scope, ctx: RunContext) -> None:
                for p, v in pairs:
                    doc.write(p, v, scope)
            return _Fn(do_set, writes=[p for p, _ in pairs], scoped=scoped)
        if isinstance(r, AddRule):
            pairs = []
            for k, v in r.add.items():
                p = self.path((*loc, "add", k), k, write=True)
                pairs.append((p, v))

            def do_add(doc: Any, scope: Scope, ctx: RunContext) -> None:
                for p, v in pairs:
                    doc.add(p, v, scope)
            return _Fn(do_add, writes=[p for p, _ in pairs], scoped=scoped)
        if isinstance(r, CopyRule):
            steps: list[Step] = []
            for j, spec in enumerate(r.copy_):
                where = (*loc, "copy") if len(r.copy_) == 1 else (*loc, "copy", j)
                src = self.path((*where, "from"), spec.from_)
                dst = self.path((*where, "to"), spec.to, write=True)

                def do_copy(doc: Any, scope: Scope, ctx: RunContext, src: Any = src, dst: Any = dst) -> None:
                    doc.copy(src, dst, scope)
                steps.append(_per_occurrence(_Fn(do_copy, reads=[src], writes=[dst], scoped=scoped)))
            return steps[0] if len(steps) == 1 else _Seq(steps)
        if isinstance(r, ComputeRule):
            steps = []
            for j, spec in enumerate(r.compute):
                where = (*loc, "compute") if len(r.compute) == 1 else (*loc, "compute", j)
                step = self.compute(spec, where, scoped)
                if step is not None:
                    steps.append(step)
            return steps[0] if len(steps) == 1 else _Seq(steps)
        if isinstance(r, DeleteRule):
            paths = [self.path((*loc, "delete", j), t, write=True) for j, t in enumerate(r.delete)]

            def do_delete(doc: Any, scope: Scope, ctx: RunContext) -> None:
                for p in paths:
                    doc.remove(p, scope)
            return _Fn(do_delete, writes=paths, scoped=scoped)
        if isinstance(r, LookupRule):
            return self.lookup(r, loc, scoped)
        if isinstance(r, WhenRule):
            try:
                cond = compile_condition(r.when, key=lambda k: self.kind.compile_path(k))
            except ValueError as e:
                self.errors.append(RuleError((*loc, "when"), str(e)))
                cond = compile_condition({})
            mark = len(self.errors)
            then = self.rules(r.then, (*loc, "then"), scoped)
            other = self.rules(r.else_, (*loc, "else"), scoped)
            step = _When(cond, then, other, scoped)
            shared = sorted(step.reads & step.writes)
            if not shared:
                return step
            # Once per occurrence of the group: compile the branches again with it in scope,
            # so their own positions in that group mean the current occurrence too.
            del self.errors[mark:]
            inner = scoped | {shared[0]}
            step = _When(cond, self.rules(r.then, (*loc, "then"), inner),
                         self.rules(r.else_, (*loc, "else"), inner), inner)
            return _Foreach(shared[0], [step])
        if isinstance(r, ForeachRule):
            try:
                group = self.kind.group_path(r.foreach)
            except ValueError as e:
                self.errors.append(RuleError((*loc, "foreach"), str(e)))
                return None
            return _Foreach(group, self.rules(r.rules, (*loc, "rules"), scoped | {group}))
        if isinstance(r, UidRule):
            self.uids = True
            paths = [self.path((*loc, "regenerate_uids", j), t, write=True) for j, t in enumerate(r.regenerate_uids)]
            steps = []
            for p in paths:
                def do_uid(doc: Any, scope: Scope, ctx: RunContext, p: Any = p) -> None:
                    old = doc.value(p, scope)
                    if old:
                        doc.write(p, ctx.uid(old), scope)
                steps.append(_per_occurrence(_Fn(do_uid, reads=[p], writes=[p], scoped=scoped)))
            return _Seq(steps)
        if isinstance(r, DropRule):
            reason = r.drop

            def do_drop(doc: Any, scope: Scope, ctx: RunContext) -> None:
                raise Drop(reason)
            return _Fn(do_drop)
        if isinstance(r, ErrorRule):
            text = r.error

            def do_error(doc: Any, scope: Scope, ctx: RunContext) -> None:
                raise MappingError(text)
            return _Fn(do_error)
        self.errors.append(RuleError(loc, f"unknown rule {type(r).__name__}"))
        return None

    def chain(self, loc: tuple[Any, ...], functions: Sequence[Any]) -> list[ValueFn]:
        out = []
        for j, fn in enumerate(functions):
            try:
                out.extend(compile_chain([fn]))
            except ValueError as e:
                self.errors.append(RuleError((*loc, j), str(e)))
        return out

    def compute(self, spec: ComputeSpec, loc: tuple[Any, ...], scoped: frozenset[str]) -> Step | None:
        """Read the ``from`` positions, join or format them, run the functions, write ``to``."""
        srcs = [self.path((*loc, "from") if len(spec.from_) == 1 else (*loc, "from", j), t)
                for j, t in enumerate(spec.from_)]
        dst = self.path((*loc, "to"), spec.to, write=True)
        chain = self.chain((*loc, "apply"), spec.apply)
        template = spec.format
        if template is not None:
            import string

            try:
                names = [f for _, f, conv, _ in string.Formatter().parse(template) if f is not None or conv]
            except ValueError as e:
                self.errors.append(RuleError((*loc, "format"), f"{template!r}: {e}"))
                names = []
                template = None
            bad = [n for n in names if not n.isdigit() or int(n) >= len(srcs)]
            if bad:
                self.errors.append(RuleError((*loc, "format"), f"{template!r}: takes {{0}}..{{{len(srcs) - 1}}} "
                                             f"for the from positions, not {{{bad[0]}}}"))
                template = None
        sep = spec.join
        invalid = spec.invalid
        phi = dst is not None and self.kind.phi_path(dst)
        where = spec.to

        def do_compute(doc: Any, scope: Scope, ctx: RunContext) -> None:
            vals = [doc.value(p, scope) for p in srcs]
            if not any(vals) and not chain:
                return
            joined = template.format(*vals) if template is not None else sep.join(v for v in vals if v)
            try:
                out = run_chain(chain, joined)
            except InvalidValue as e:
                if not any(vals):
                    return  # nothing to read: a date function has nothing to say about an empty field
                if invalid == "keep":
                    return
                if invalid == "drop":
                    raise Drop(f"{where}: {e}") from None
                if invalid == "error":
                    shown = "" if phi else f" ({joined[:64]!r})"
                    raise MappingError(f"{where}: {e}{shown}") from None
                out = "" if invalid == "clear" else invalid
            if not any(vals) and out == "":
                return  # nothing to read and no default: the target stays as it is
            doc.write(dst, out, scope)
        return _per_occurrence(_Fn(do_compute, reads=srcs, writes=[dst], scoped=scoped), once_if_none=True)

    def lookup(self, r: LookupRule, loc: tuple[Any, ...], scoped: frozenset[str]) -> Step | None:
        spec = r.lookup
        src = self.path((*loc, "lookup", "field"), spec.field)
        normalise = self.chain((*loc, "lookup", "apply"), spec.apply)
        name = spec.table
        table: Table | None = None
        if self.tables is not None:
            if name not in self.tables:
                known = ", ".join(sorted(self.tables)) or "none declared"
                self.errors.append(RuleError((*loc, "lookup", "table"),
                                             f"no table {name!r} under top-level tables: ({known})"))
                return None
            table = self.tables[name]
        columns = set(table.columns) if table is not None else None
        sets = spec.set if spec.set is not None or spec.add is not None else {spec.field: "target_code"}
        targets = []
        for k, v in (sets or {}).items():
            p = self.path((*loc, "lookup", "set", k), k, write=True)
            targets.append((p, v))
        adds = []
        for k, v in (spec.add or {}).items():
            p = self.path((*loc, "lookup", "add", k), k, write=True)
            adds.append((p, v))
        missing = spec.missing
        phi = src is not None and self.kind.phi_path(src)
        where = spec.field

        def resolve(v: Any, row: Mapping[str, str] | None, default: str | None) -> Any:
            if isinstance(v, str):
                is_col = v in row if row is not None else (columns is not None and v in columns)
                if is_col:
                    return row[v] if row is not None else default
                return v
            if isinstance(v, list):
                return [resolve(x, row, default) for x in v]
            if isinstance(v, dict):
                return {k: resolve(x, row, default) for k, x in v.items()}
            return v

        def do_lookup(doc: Any, scope: Scope, ctx: RunContext) -> None:
            code = doc.value(src, scope)
            if normalise and code:
                try:
                    code = run_chain(normalise, code)
                except InvalidValue:
                    code = ""
            if not code:
                return
            t = table if table is not None else _runtime_table(self.tables, name)
            row = t.get(code) if t is not None else None
            default = None
            if row is None:
                if missing == "keep":
                    return
                if missing == "drop":
                    raise Drop(f"{where}: code not in table {name}")
                if missing == "error":
                    shown = "(value withheld: patient data)" if phi else repr(code[:64])
                    raise MappingError(f"{where}: code {shown} not in table {name}")
                default = missing
            for p, v in targets:
                doc.write(p, resolve(v, row, default), scope)
            for p, v in adds:
                doc.add(p, resolve(v, row, default), scope)
        step = _Fn(do_lookup, reads=[src], writes=[p for p, _ in targets + adds], scoped=scoped)
        return _per_occurrence(step)


def _runtime_table(tables: Mapping[str, Table | None] | None, name: str) -> Table | None:
    return tables.get(name) if tables is not None else None


class _Seq(Step):
    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.reads = frozenset().union(*(s.reads for s in steps))
        self.writes = frozenset().union(*(s.writes for s in steps))

    def run(self, doc: Any, scope: Scope, ctx: RunContext) -> None:
        for s in self.steps:
            s.run(doc, scope, ctx)


def _models(rules: Sequence[Any]) -> Sequence[Any]:
    """Rules as models; plain mappings (tests, tools) are validated into them first."""
    if any(isinstance(r, Mapping) for r in rules):
        from pydantic import TypeAdapter

        from engine.mapping.rules import RuleList

        return TypeAdapter(RuleList).validate_python(list(rules))
    return rules


def check_rules(rules: Sequence[Any], kind: Kind, tables: Mapping[str, Table | None] | None) -> list[RuleError]:
    """Every problem in ``rules`` (empty when they compile); what `medrelay check` reports."""
    c = _Compiler(kind, tables)
    c.rules(_models(rules), (), frozenset())
    return c.errors


def compile_rules(rules: Sequence[Any], kind: Kind, tables: Mapping[str, Table | None] | None) -> Program:
    """The program of ``rules``; raises the first RuleError when there is one (check_rules lists all)."""
    c = _Compiler(kind, tables)
    steps = c.rules(_models(rules), (), frozenset())
    if c.errors:
        raise c.errors[0]
    return Program(kind, steps, needs_uid_key=c.uids)
