"""What the engine expects of a source, a transform and a destination.

These protocols are the whole contract between `engine` and the component packages.
A component module registers a factory with `engine.registry.component`; the engine
calls the factory with the validated config model and a context, and gets back one
of the objects below.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from engine.envelope import Envelope


class ComponentConfig(BaseModel):
    """Base for every component's config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def field_of(model: type[BaseModel], name: str, **changes: Any) -> Any:
    """``model``'s field ``name`` with ``changes`` (default, description), for a config that
    inherits a shared block of keys and differs in one: its checks and the rest of its text stay
    the block's, so the block is still written once (docs/notes/config-bases.md)."""
    info = copy.copy(model.model_fields[name])
    for attr, value in changes.items():
        setattr(info, attr, value)
    return info


class DeliveryError(Exception):
    """A destination could not deliver. ``permanent`` skips the remaining retries.

    ``retry_after`` (seconds from now) is the earliest the peer asked to be tried again (an
    HTTP ``Retry-After``): the next attempt is not before it, even when the route's backoff
    is shorter (capped at ``engine.pipeline.RETRY_AFTER_MAX``). ``counted=False`` (a 429 "too
    many requests": the peer is up and throttling) keeps the try from counting towards
    ``retry.max_attempts``, so a throttle alone never dead-letters a delivery.
    """

    def __init__(
        self, message: str, *, permanent: bool = False, retry_after: float | None = None, counted: bool = True
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after
        self.counted = counted


class Reference(NamedTuple):
    """A config field that names another part of the configuration (``references()`` of a
    component config): ``loc`` inside the component, ``kind`` "route" (a route of the same
    channel, not the one holding it) or "dicom_channel" (a channel with a DICOM source).
    The loader checks each one (engine/config.py), so a typo is a topology error at `check`,
    not a wait that never ends, or an answer that never waited, at run time."""

    loc: tuple[str | int, ...]
    kind: Literal["route", "dicom_channel"]
    name: str


# A transform: pure function of one envelope. Returns the new envelope (or several,
# e.g. a study split per series), or raises engine.envelope.Drop to filter.
Transform = Callable[[Envelope], "Envelope | list[Envelope]"]


@runtime_checkable
class Destination(Protocol):
    async def send(self, envelope: Envelope) -> str | None:
        """Deliver; return a short non-PHI detail (peer's ACK code, HTTP status) or raise DeliveryError."""

    async def close(self) -> None: ...


@runtime_checkable
class Listener(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound: tests configure port 0 and read it here."""


def secret_field(**kwargs: Any) -> Any:
    """A config field that must come from `${ENV}` or `file:` in YAML, never a literal."""
    from pydantic import Field

    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra["secret"] = True
    return Field(json_schema_extra=extra, **kwargs)
