"""`medrelay test`: run a route's transforms on a stored input and compare with the expected output.

Config as code: an integration engineer keeps cases beside channels.yaml and runs
them in CI before a config reaches production. Transforms run against a scratch
store and key file, never the production ones, and nothing is sent anywhere.

A mismatch is shown as a unified diff of the normalised outputs (HL7 one segment a line,
FHIR indented JSON, DICOM one attribute a line). With ``update=True`` (``medrelay test
--update``) the expected file of a case whose output changed is rewritten with what the
route makes now, in the file's own style (line ends, indentation), so a deliberate change
of a mapping is one command and a reviewable diff in git.
"""

from __future__ import annotations

import difflib
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog.testing
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from engine import registry
from engine.audit.trail import Audit
from engine.config import Settings, source_kind
from engine.context import ComponentContext
from engine.envelope import Drop, Envelope
from engine.match import matches
from engine.pipeline import apply_transforms
from engine.security.crypto import KeyRing
from engine.store.db import Store

_VOLATILE_HL7 = re.compile(r"^(MSH(?:\|[^|\r]*){5})\|[^|\r]*(\|(?:[^|\r]*\|){2})[^|\r]*", re.M)
_VOLATILE_JSON = {"id", "fullUrl", "lastUpdated", "timestamp"}


def _norm_json(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _norm_json(v) for k, v in node.items() if k not in _VOLATILE_JSON}
    if isinstance(node, list):
        return [_norm_json(v) for v in node]
    if isinstance(node, str) and node.startswith("urn:uuid:"):
        return "urn:uuid:*"
    return node


def _norm_hl7(text: str) -> str:
    """Blank MSH-7 (time) and MSH-10 (control id): they differ on every run."""
    return _VOLATILE_HL7.sub(r"\1|\2", text.replace("\r\n", "\r").replace("\n", "\r")).strip()


MAX_DIFF_LINES = 80


def _dicom_lines(data: bytes) -> list[str]:
    from pydicom import dcmread

    try:
        import io

        ds = dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # a broken expected file is a difference, said plainly
        return [f"(not readable as DICOM: {type(e).__name__})"]
    return [str(el)[:200] for el in ds.iterall() if el.tag != 0x7FE00010]


def _lines(kind: str, data: bytes) -> list[str]:
    if kind == "fhir":
        return json.dumps(_norm_json(json.loads(data)), indent=2, ensure_ascii=False, sort_keys=True).splitlines()
    if kind == "hl7v2":
        return _norm_hl7(data.decode("latin-1")).split("\r")
    if kind == "dicom":
        return _dicom_lines(data)
    return data.decode("latin-1").splitlines()


def _compare(kind: str, got: bytes, want: bytes, name: str = "expected") -> str | None:
    """None when equal (after normalising); otherwise a unified diff, expected -> got."""
    if kind == "fhir":
        if _norm_json(json.loads(got)) == _norm_json(json.loads(want)):
            return None
    elif kind == "hl7v2":
        if _norm_hl7(got.decode("latin-1")) == _norm_hl7(want.decode("latin-1")):
            return None
    elif got == want:
        return None
    diff = list(difflib.unified_diff(_lines(kind, want), _lines(kind, got), f"{name} (expected)", "got",
                                     lineterm="", n=1))
    if not diff:  # same attributes, other bytes (encoding, pixel data)
        return f"{kind} output differs from {name} (not in the attributes shown)"
    more = len(diff) - MAX_DIFF_LINES
    return "\n".join(diff[:MAX_DIFF_LINES] + ([f"... {more} more lines"] if more > 0 else []))


def _rewrite(path: Path, kind: str, got: bytes) -> None:
    """Write ``got`` as the expected output, in the style of the file it replaces."""
    if kind == "fhir":
        old = path.read_text() if path.exists() else "{\n"
        compact = not old.lstrip().startswith("{\n") and "\n " not in old
        doc = json.loads(got)
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":")) if compact else \
            json.dumps(doc, ensure_ascii=False, indent=2) + "\n"
        data = text.encode("utf-8")
    elif kind == "hl7v2":
        old_bytes = path.read_bytes() if path.exists() else b""
        data = got.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        if b"\r\n" in old_bytes:
            data = data.replace(b"\r", b"\r\n")
        elif b"\n" in old_bytes and b"\r" not in old_bytes:
            data = data.replace(b"\r", b"\n")
    else:
        data = got
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@dataclass
class CaseResult:
    """One case's outcome; unpacks as (name, ok, detail) like the tuples it replaced."""

    name: str
    ok: bool
    detail: str = ""
    updated: bool = False  # the expected file was rewritten (update=True)

    def __iter__(self) -> Iterator[object]:
        return iter((self.name, self.ok, self.detail))


def run_cases(settings: Settings, folder: Path, *, update: bool = False) -> list[CaseResult]:
    """Run every case in ``folder``; with ``update``, rewrite the expected file of each that differs."""
    results: list[CaseResult] = []
    if not folder.is_dir():
        return results
    with tempfile.TemporaryDirectory() as tmp:
        with structlog.testing.capture_logs():  # "new key file, back it up" is about a scratch file
            store = Store(f"sqlite:///{tmp}/scratch.db", Path(tmp) / "blobs", KeyRing(Path(tmp) / "keys.json"))
            store.migrate()
        audit = Audit(store)
        for case_file in sorted(folder.glob("*/case.yaml")):
            name = case_file.parent.name
            try:
                results.append(CaseResult(name, *_run_one(settings, store, audit, case_file, update)))
            except CaseError as e:
                results.append(CaseResult(name, False, str(e)))
            except Exception as e:
                results.append(CaseResult(name, False, f"{type(e).__name__}: {e}"))
        store.dispose()
    return results


class CaseError(Exception):
    """A case that cannot run as written: said in one line, with what would be valid."""


def _file(case_file: Path, case: dict[str, Any], key: str) -> bytes:
    name = case.get(key)
    if not isinstance(name, str) or not name:
        raise CaseError(f"{case_file}: `{key}:` names no file")
    try:
        return (case_file.parent / name).read_bytes()
    except OSError as e:
        raise CaseError(f"{case_file}: {key} file {name}: {e.strerror}") from None


def _load_case(settings: Settings, case_file: Path) -> tuple[dict[str, Any], Any, Any]:
    try:
        case = YAML(typ="safe").load(case_file.read_text())
    except YAMLError as e:
        raise CaseError(f"{case_file}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(case, dict):
        raise CaseError(f"{case_file}: expected a mapping with channel, route, input, expect")
    ch = settings.channels.get(case.get("channel"))
    if ch is None:
        raise CaseError(f"{case_file}: channel {case.get('channel')!r} is not in {settings.path.name} "
                        f"(channels: {', '.join(settings.channels)})")
    route = next((r for r in ch.routes if r.name == case.get("route")), None)
    if route is None:
        raise CaseError(f"{case_file}: channel {case['channel']} has no route {case.get('route')!r} "
                        f"(routes: {', '.join(r.name for r in ch.routes) or 'none'})")
    return case, ch, route


def _run_one(settings: Settings, store: Store, audit: Audit, case_file: Path,
             update: bool = False) -> tuple[bool, str, bool]:
    case, ch, route = _load_case(settings, case_file)
    kind = source_kind(ch.source) or "hl7v2"
    payload = _file(case_file, case, "input")
    headers: dict[str, Any] = dict(case.get("headers") or {})
    if kind == "hl7v2":
        from engine.hl7.message import read_header

        headers = {**read_header(payload).as_headers(), **headers}
    env = Envelope(channel=case["channel"], kind=kind, payload=payload, headers=headers)  # type: ignore[arg-type]
    routed = matches(dict(route.when), env)
    if "expect_routed" in case and bool(case["expect_routed"]) != routed:
        return False, f"route {'matched' if routed else 'did not match'}", False
    if not routed:
        return (True, "", False) if case.get("expect_routed") is False else (False, "route did not match", False)
    ctx = ComponentContext(settings=settings, store=store, keyring=store.keyring, audit=audit,
                           channel=case["channel"], route=route.name)
    transforms = [registry.get("transform", t.type).factory(t, ctx) for t in route.transforms]
    try:
        outs = apply_transforms(transforms, env)
    except Drop as d:
        return (True, "", False) if case.get("expect_dropped") else (False, f"dropped: {d.reason}", False)
    if case.get("expect_dropped"):
        return False, "expected the route to drop the message; it gave an output", False
    expect = case.get("expect")
    if expect is None:
        return True, "", False
    out = outs[0]
    target = case_file.parent / str(expect)
    if update and case_file.parent.resolve() not in target.resolve().parents:
        raise CaseError(f"{case_file}: --update writes only inside the case folder, not {expect}")
    if update and isinstance(expect, str) and expect and not target.exists():
        _rewrite(target, out.kind, out.payload)
        return True, f"{expect} written", True
    want = _file(case_file, case, "expect")
    diff = _compare(out.kind, out.payload, want, str(expect))
    if diff is None:
        return True, "", False
    if update:
        _rewrite(target, out.kind, out.payload)
        return True, f"{expect} rewritten", True
    return False, diff, False
