"""Local users with argon2id password hashes, API tokens stored as SHA-256, and role checks.

Passwords are hashed with argon2id (argon2-cffi, RFC 9106 parameters of the library's
profile), so a stolen database does not give up passwords cheaply. API tokens are 32 random
bytes (URL-safe base64, prefixed ``mrt_`` so a leaked one is recognisable in a scanner);
being high-entropy, a plain SHA-256 suffices to store them and lets a request be checked
with one indexed lookup instead of an argon2 verification per call.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import insert, select, update

from engine.auth.tables import api_tokens, users

ROLES = ("viewer", "operator", "admin")
_hasher = PasswordHasher()
# A fixed hash to verify against when the user does not exist, so timing does not tell
# an attacker which user names are real.
_DUMMY = _hasher.hash(secrets.token_urlsafe(16))


class AuthError(Exception):
    """A user-facing refusal (unknown user, bad role, weak password); never says which part was wrong at login."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    source: str = "local"

    def can(self, role: str) -> bool:
        """Whether this user holds ``role`` or a higher one."""
        return ROLES.index(self.role) >= ROLES.index(role)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")


def add_user(store: Any, name: str, role: str, password: str | None, *, source: str = "local") -> User:
    _check_role(role)
    if not name or len(name) > 128 or any(c.isspace() for c in name):
        raise AuthError("a user name is 1 to 128 characters without spaces")
    if password is not None and len(password) < 12:
        raise AuthError("a password needs at least 12 characters")
    with store.engine.begin() as conn:
        if conn.execute(select(users.c.name).where(users.c.name == name)).first():
            raise AuthError(f"user {name!r} exists")
        conn.execute(insert(users).values(name=name, role=role, source=source, created_at=time.time(),
                                          password_hash=_hasher.hash(password) if password else None))
    return User(name, role, source)


def set_role(store: Any, name: str, role: str) -> None:
    _check_role(role)
    with store.engine.begin() as conn:
        if not conn.execute(update(users).where(users.c.name == name).values(role=role)).rowcount:
            raise AuthError(f"no user {name!r}")


def get_user(store: Any, name: str) -> User | None:
    with store.engine.connect() as conn:
        r = conn.execute(select(users.c.name, users.c.role, users.c.source)
                         .where(users.c.name == name, users.c.disabled == 0)).first()
    return User(r.name, r.role, r.source) if r else None


def list_users(store: Any) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(users.c.name, users.c.role, users.c.source, users.c.created_at, users.c.disabled)
            .order_by(users.c.name))]


def verify_password(store: Any, name: str, password: str) -> User | None:
    """The user if ``password`` is right, else None (the same time either way)."""
    with store.engine.connect() as conn:
        r = conn.execute(select(users.c.name, users.c.role, users.c.source, users.c.password_hash)
                         .where(users.c.name == name, users.c.disabled == 0)).first()
    stored = r.password_hash if r is not None and r.password_hash else _DUMMY
    try:
        _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if r is None or not r.password_hash:
        return None
    if _hasher.check_needs_rehash(stored):
        with store.engine.begin() as conn:
            conn.execute(update(users).where(users.c.name == name).values(password_hash=_hasher.hash(password)))
    return User(r.name, r.role, r.source)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(store: Any, name: str) -> tuple[str, str]:
    """A new API token for ``name``: (token id, token). The token is shown once and never stored."""
    if get_user(store, name) is None:
        raise AuthError(f"no user {name!r}")
    token = "mrt_" + secrets.token_urlsafe(32)
    tid = secrets.token_hex(6)
    with store.engine.begin() as conn:
        conn.execute(insert(api_tokens).values(id=tid, token_sha256=_digest(token), user=name,
                                               created_at=time.time()))
    return tid, token


def revoke_token(store: Any, token_id: str) -> bool:
    with store.engine.begin() as conn:
        return bool(conn.execute(update(api_tokens).where(api_tokens.c.id == token_id,
                                                          api_tokens.c.revoked_at.is_(None))
                                 .values(revoked_at=time.time())).rowcount)


def list_tokens(store: Any, name: str | None = None) -> list[dict[str, Any]]:
    t = api_tokens
    q = select(t.c.id, t.c.user, t.c.created_at, t.c.revoked_at, t.c.last_used_at).order_by(t.c.created_at)
    if name is not None:
        q = q.where(t.c.user == name)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def user_for_token(store: Any, token: str) -> User | None:
    """The user a bearer token belongs to, if it is valid and not revoked."""
    if not token.startswith("mrt_"):
        return None
    t, u = api_tokens, users
    with store.engine.connect() as conn:
        r = conn.execute(select(u.c.name, u.c.role, u.c.source).select_from(t.join(u, u.c.name == t.c.user))
                         .where(t.c.token_sha256 == _digest(token), t.c.revoked_at.is_(None),
                                u.c.disabled == 0)).first()
    return User(r.name, r.role, r.source) if r else None
