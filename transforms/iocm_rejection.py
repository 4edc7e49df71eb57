"""IHE IOCM: recognise a rejection note (KOS titled with a CID 7011 code) for the archive.

Route the DICOM channel's Key Object Selection documents through it to ``{type: store}``: a
rejection note gets ``store_as: iocm`` (and ``iocm_delete`` when configured), and the ``iocm``
handler (engine/store/dicom/iocm.py) hides the instances it lists from C-FIND, C-MOVE, C-GET
and DICOMweb, or deletes them. Anything else is dropped (filtered), so the route can take every
instance of the channel::

    - name: iocm
      when: {SOPClassUID: 1.2.840.10008.5.1.4.1.1.88.59}
      transforms: [{type: iocm_rejection, delete: false}]
      to: {type: store}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import structlog
from pydantic import Field, field_validator

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import Drop, Envelope
from engine.registry import component
from engine.store.dicom.iocm import REJECTION_TITLES, read_rejection
from transforms.dicom_common import read_dataset

log = structlog.get_logger()


class IocmRejectionConfig(ComponentConfig):
    """Hide (or delete) the instances an IOCM rejection note names."""

    type: Literal["iocm_rejection"] = Field(description="Component type.")
    delete: bool = Field(False, description="also remove the rejected instances' stored bytes (their blob, or "
                         "the message that brought them once its deliveries are final); else only hide them")
    codes: list[str] = Field(default_factory=lambda: sorted(REJECTION_TITLES),
                             description="CID 7011 title codes (scheme DCM) acted on; others are dropped")

    @field_validator("codes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(REJECTION_TITLES))
        if unknown:
            raise ValueError(f"not CID 7011 rejection titles: {unknown}; known: {sorted(REJECTION_TITLES)}")
        return v


@component("transform", "iocm_rejection", config=IocmRejectionConfig, kinds=("dicom",))
def build(config: IocmRejectionConfig, ctx: ComponentContext | None = None) -> Callable[[Envelope], Envelope]:
    """A KOS rejection note (CID 7011 title) -> the archive hides or deletes the instances it lists."""
    codes = set(config.codes)

    def transform(env: Envelope) -> Envelope:
        if env.headers.get("event"):
            raise Drop("iocm_rejection: an event message, not an instance")
        rejection = read_rejection(read_dataset(env.payload), codes)
        if rejection is None:
            raise Drop("iocm_rejection: not a rejection note (KOS with a CID 7011 title)")
        log.debug("iocm_rejection.note", message_id=env.id, reason=rejection.code, instances=len(rejection.refs))
        return env.derive(headers={**env.headers, "store_as": "iocm", "iocm_delete": "1" if config.delete else "0",
                                   "iocm_reason": rejection.code})

    return transform
