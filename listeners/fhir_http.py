"""The FHIR listener's flavour of the HTTP stack: protocol-level errors as OperationOutcome.

The guarded h11 protocol (idle/header/body timeouts, connection cap, 431/414/408) is
``engine.http.protocol``, shared by every medrelay HTTP server; its names are kept here
for the modules that import them from this place.
"""

from __future__ import annotations

import json

from engine.http.protocol import GuardedH11Protocol, HttpLimits, protocol_class, raw_response
from engine.store.fhir.params import operation_outcome

__all__ = ["GuardedH11Protocol", "HttpLimits", "outcome_error_body", "protocol_class", "raw_response"]


def outcome_error_body(status: int, code: str, text: str) -> tuple[str, bytes]:
    """An OperationOutcome (``code`` is its IssueType), as every FHIR error of the listener."""
    body = json.dumps(operation_outcome("error" if status < 500 else "fatal", code, text)).encode()
    return "application/fhir+json; charset=utf-8", body
