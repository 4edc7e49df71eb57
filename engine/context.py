"""What a component gets from the engine when it is built.

A transform or destination never reaches for globals: the store, the key ring, the
audit trail and its own names come in here, so tests can build one in isolation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from engine.audit.trail import Audit
    from engine.config import Settings
    from engine.intake import Intake
    from engine.security.crypto import KeyRing
    from engine.store.db import Store


@dataclass
class ComponentContext:
    settings: Settings
    store: Store
    keyring: KeyRing
    audit: Audit
    channel: str = ""
    route: str = ""
    intake: Intake | None = None  # sources only

    @property
    def log(self) -> Any:
        return structlog.get_logger().bind(channel=self.channel, route=self.route or None)
