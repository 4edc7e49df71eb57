"""Bearer-token authentication of the HTTP listeners (FHIR, DICOMweb, HTTP sources).

Written once here so that no two listeners can drift apart in how they compare tokens:
only SHA-256 fingerprints are kept, compared in constant time, and an accepted client is
named by the start of its token's fingerprint, never by the token.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import Field, model_validator

from engine.components import ComponentConfig, secret_field


class BearerAuth(ComponentConfig):
    """Either bearer tokens or an explicit `open: true`; there is no silent default."""

    bearer_tokens: list[str] = secret_field(
        default_factory=list, description="accepted `Authorization: Bearer` tokens, e.g. [\"${API_TOKEN}\"]")
    open: bool = Field(False, description="serve without authentication (only for closed test networks)")

    @model_validator(mode="after")
    def _one_mode(self) -> BearerAuth:
        if self.open and self.bearer_tokens:
            raise ValueError("auth: choose bearer_tokens or open: true, not both")
        if not self.open and not self.bearer_tokens:
            raise ValueError("auth needs bearer_tokens (or open: true to serve without authentication)")
        if any(not t for t in self.bearer_tokens):
            raise ValueError("auth.bearer_tokens: empty token")
        return self


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class BearerTokens:
    """The accepted tokens, kept only as SHA-256 fingerprints and compared in constant time."""

    def __init__(self, auth: BearerAuth) -> None:
        self.open = auth.open
        self._fps = [fingerprint(t) for t in auth.bearer_tokens]

    def check(self, authorization: str) -> tuple[str | None, str | None]:
        """(actor, None) when the Authorization header is accepted, else (None, reason);
        the actor names a token by the start of its fingerprint, never by the token."""
        if self.open:
            return "anonymous", None
        scheme, _, token = authorization.partition(" ")
        fp = fingerprint(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if fp is not None and any(hmac.compare_digest(fp, t) for t in self._fps):
            return f"bearer:{fp[:12]}", None
        return None, "bearer token missing" if fp is None else "bearer token not accepted"

    @staticmethod
    def challenge(reason: str) -> str:
        return 'Bearer realm="medrelay"' + ("" if reason == "bearer token missing" else ', error="invalid_token"')
