"""`medrelay test`: run a route's transforms on a stored input and compare with the expected output.

Config as code: an integration engineer keeps cases beside channels.yaml and runs
them in CI before a config reaches production. Transforms run against a scratch
store and key file, never the production ones, and nothing is sent anywhere.
"""

from __future__ import annotations

import json
import re
import tempfile
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


def _compare(kind: str, got: bytes, want: bytes) -> str | None:
    if kind == "fhir":
        a, b = _norm_json(json.loads(got)), _norm_json(json.loads(want))
        return None if a == b else f"FHIR differs:\n got {json.dumps(a)[:800]}\nwant {json.dumps(b)[:800]}"
    if kind == "hl7v2":
        a, b = _norm_hl7(got.decode("latin-1")), _norm_hl7(want.decode("latin-1"))
        return None if a == b else f"HL7 differs:\n got {a!r}\nwant {b!r}"
    return None if got == want else "bytes differ"


def run_cases(settings: Settings, folder: Path) -> list[tuple[str, bool, str]]:
    results: list[tuple[str, bool, str]] = []
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
                results.append((name, *_run_one(settings, store, audit, case_file)))
            except CaseError as e:
                results.append((name, False, str(e)))
            except Exception as e:
                results.append((name, False, f"{type(e).__name__}: {e}"))
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


def _run_one(settings: Settings, store: Store, audit: Audit, case_file: Path) -> tuple[bool, str]:
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
        return False, f"route {'matched' if routed else 'did not match'}"
    if not routed:
        return (True, "") if case.get("expect_routed") is False else (False, "route did not match")
    ctx = ComponentContext(settings=settings, store=store, keyring=store.keyring, audit=audit,
                           channel=case["channel"], route=route.name)
    transforms = [registry.get("transform", t.type).factory(t, ctx) for t in route.transforms]
    try:
        outs = apply_transforms(transforms, env)
    except Drop as d:
        return (True, "") if case.get("expect_dropped") else (False, f"dropped: {d.reason}")
    expect = case.get("expect")
    if expect is None:
        return True, ""
    want = _file(case_file, case, "expect")
    diff = _compare(outs[0].kind, outs[0].payload, want)
    return (diff is None), (diff or "")
