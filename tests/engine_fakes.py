"""Test-only components for exercising the engine core without a network protocol.

The protocol tests (MLLP, DICOM, FHIR) use real peers; these exist so the queue,
retry and dead-letter logic can be tested on their own with exact control of failures.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from engine.components import ComponentConfig, DeliveryError
from engine.registry import component

OUTBOX: dict[str, list[bytes]] = {}
SCRIPT: dict[str, list[str]] = {}  # per destination name: "ok" | "fail" | "perm", consumed in order


class NullSourceConfig(ComponentConfig):
    type: Literal["test_null"]


class NullSource:
    def __init__(self, ctx) -> None:
        self.ctx = ctx

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", 0)


@component("source", "test_null", config=NullSourceConfig)
def build_source(config, ctx):
    return NullSource(ctx)


class CollectConfig(ComponentConfig):
    type: Literal["test_collect"]
    name: str


class Collect:
    def __init__(self, name: str) -> None:
        self.name = name

    async def send(self, envelope) -> str | None:
        await asyncio.sleep(0)
        script = SCRIPT.get(self.name) or []
        step = script.pop(0) if script else "ok"
        if step == "fail":
            raise DeliveryError("scripted failure")
        if step == "perm":
            raise DeliveryError("scripted permanent failure", permanent=True)
        OUTBOX.setdefault(self.name, []).append(envelope.payload)
        return "ok"

    async def close(self) -> None:
        return None


@component("destination", "test_collect", config=CollectConfig)
def build_collect(config, ctx):
    return Collect(config.name)


class UpperConfig(ComponentConfig):
    type: Literal["test_upper"]
    drop_if: str | None = None
    explode_if: str | None = None
    quarantine_if: str | None = None


@component("transform", "test_upper", config=UpperConfig)
def build_upper(config, ctx):
    from engine.envelope import Drop

    def upper(env):
        if config.drop_if and config.drop_if.encode() in env.payload:
            raise Drop("matched drop_if")
        if config.quarantine_if and config.quarantine_if.encode() in env.payload:
            from transforms.deid_pixels import Quarantine

            raise Quarantine("quarantined: test")
        if config.explode_if and config.explode_if.encode() in env.payload:
            raise ValueError("boom")
        return env.derive(payload=env.payload.upper())

    return upper


def collect_yaml(*, max_attempts: int, initial_delay: float = 0.05, max_delay: float = 0.1,
                 store_extra: str = "", route_extra: str = "") -> str:
    """A channels.yaml template (placeholders {url} and {name}): test_null source, one route `a`
    to the test_collect destination `{name}`, with the given retry policy."""
    return f"""
store: {{{{url: "{{url}}", blobs: data/blobs{store_extra}}}}}
keys: {{{{kek_file: data/keys.json}}}}
channels:
  in:
    source: {{{{type: test_null}}}}
    routes:
      - name: a{route_extra}
        to: {{{{type: test_collect, name: {{name}}}}}}
        retry: {{{{max_attempts: {max_attempts}, initial_delay: {initial_delay}, max_delay: {max_delay}}}}}
"""
