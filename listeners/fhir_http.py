"""The FHIR listener's flavour of the HTTP stack: protocol-level errors as OperationOutcome.

The guarded h11 protocol (idle/header/body timeouts, connection caps, 431/414/408) is
``engine.http.protocol``, shared by every medrelay HTTP server; the FHIR listener gives it
this error body.
"""

from __future__ import annotations

import json

from engine.store.fhir.params import operation_outcome


def outcome_error_body(status: int, code: str, text: str) -> tuple[str, bytes]:
    """An OperationOutcome (``code`` is its IssueType), as every FHIR error of the listener."""
    body = json.dumps(operation_outcome("error" if status < 500 else "fatal", code, text)).encode()
    return "application/fhir+json; charset=utf-8", body
