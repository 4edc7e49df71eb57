"""One registry for every pluggable component: sources, transforms, destinations.

Each component declares its config model next to its code; `engine.config` builds
the YAML schema from what is registered here and `medrelay components` prints the
docs from the same models, so validation and documentation cannot drift apart.
The engine never imports listeners/routes/transforms: they are found through the
``medrelay.components`` entry point group (see pyproject.toml).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Literal

from pydantic import BaseModel

Role = Literal["source", "transform", "destination"]
ROLES: tuple[Role, ...] = ("source", "transform", "destination")


@dataclass(frozen=True)
class Component:
    role: Role
    name: str
    config: type[BaseModel]
    factory: Callable[..., Any]
    kinds: tuple[str, ...]
    description: str


_REGISTRY: dict[tuple[Role, str], Component] = {}
_loaded = False


def component(
    role: Role, name: str, *, config: type[BaseModel], kinds: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``factory(config, ctx, ...)`` as the ``type: name`` component of ``role``.

    ``kinds`` lists the envelope kinds a transform or destination accepts (empty: any);
    `medrelay check` uses it to catch a `dicom_to_hl7` placed on an HL7 channel.
    """
    if role not in ROLES:
        raise ValueError(f"unknown component role {role!r}")

    def register(factory: Callable[..., Any]) -> Callable[..., Any]:
        key = (role, name)
        existing = _REGISTRY.get(key)
        if existing is not None and existing.factory.__qualname__ != factory.__qualname__:
            raise ValueError(f"{role} {name!r} registered twice")
        _REGISTRY[key] = Component(
            role=role,
            name=name,
            config=config,
            factory=factory,
            kinds=kinds,
            description=(factory.__doc__ or config.__doc__ or "").strip(),
        )
        return factory

    return register


def load_builtins() -> None:
    """Import every module named in the ``medrelay.components`` entry point group.

    ``MEDRELAY_PLUGINS`` (comma-separated module names) adds site-specific components
    without packaging them; the test suite uses it to load its scripted fakes into
    a `medrelay run` subprocess.
    """
    global _loaded
    if _loaded:
        return
    for ep in entry_points(group="medrelay.components"):
        importlib.import_module(ep.value)
    for name in filter(None, (m.strip() for m in os.environ.get("MEDRELAY_PLUGINS", "").split(","))):
        importlib.import_module(name)
    _loaded = True


def get(role: Role, name: str) -> Component:
    load_builtins()
    try:
        return _REGISTRY[(role, name)]
    except KeyError:
        raise KeyError(f"no {role} component named {name!r}") from None


def components(role: Role) -> list[Component]:
    load_builtins()
    return sorted((c for (r, _), c in _REGISTRY.items() if r == role), key=lambda c: c.name)
