"""`Retry-After` (RFC 9110 section 10.2.3) as a peer's answer to a destination.

A server that answers 429 (too many requests) or 503 (unavailable) may say when to come
back, as delay-seconds (``Retry-After: 120``) or as an HTTP-date. A destination turns that
into ``DeliveryError(retry_after=...)`` and the pipeline does not try the delivery again
before it (engine/pipeline.py), so a throttled burst does not spend its attempts inside the
window the server asked for.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

THROTTLED = 429  # "too many requests": the server is up; its Retry-After try is not counted
UNAVAILABLE = 503


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds from ``now`` the header asks to wait (0 for a date in the past); None when the
    header is absent or unreadable (then the route's own backoff applies)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():  # delay-seconds = 1*DIGIT
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)
