"""`filter`: keep or drop messages of any kind by conditions (the language of route `when:`).

A route's `when:` decides at intake whether the route takes a message at all; a
`filter` step decides inside the route, after earlier transforms (a filter on the FHIR
Bundle an `hl7_to_fhir` made, or on what an `hl7_map` wrote). A dropped message's
delivery ends `filtered`, with the reason recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.components import ComponentConfig
from engine.envelope import Drop, Envelope
from engine.mapping.conditions import compile_condition
from engine.mapping.reader import EnvelopeReader
from engine.registry import component


class FilterConfig(ComponentConfig):
    """Keep or drop messages by conditions: in, not, regex, exists/missing, numbers, dates, any/all."""

    type: Literal["filter"] = Field(description="Component type.")
    keep: dict[str, Any] | None = Field(None, description="condition a message must meet to go on "
                                        "(the others are filtered)", examples=[{"MSH-9.1": ["ORU", "ORM"]}])
    drop: dict[str, Any] | None = Field(None, description="condition that filters a message",
                                        examples=[{"PID-3.1": {"regex": "^TEST"}}])
    reason: str = Field("filter", description="recorded with a filtered delivery (no patient data)")

    @field_validator("keep", "drop")
    @classmethod
    def _compiles(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            compile_condition(v)
        return v

    @model_validator(mode="after")
    def _something(self) -> FilterConfig:
        if self.keep is None and self.drop is None:
            raise ValueError("a filter needs keep:, drop: or both")
        return self


@component("transform", "filter", config=FilterConfig)
def build(config: FilterConfig, ctx: Any = None) -> Callable[[Envelope], Envelope]:
    """Keep or drop messages of any kind by conditions (in, not, regex, exists, numbers, dates, any/all)."""
    keep = compile_condition(config.keep) if config.keep is not None else None
    drop = compile_condition(config.drop) if config.drop is not None else None
    reason = config.reason

    def transform(env: Envelope) -> Envelope:
        read = EnvelopeReader(env.kind, env.payload, env.headers)
        if keep is not None and not keep.test(read):
            raise Drop(f"{reason}: keep condition not met")
        if drop is not None and drop.test(read):
            raise Drop(f"{reason}: drop condition met")
        return env

    return transform
