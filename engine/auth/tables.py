"""The users, API tokens and console (sessions, failed logins) tables (see engine/auth/users.py and
engine/console/auth.py for what each column holds)."""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, String, Table

from engine.store.schema import metadata

users = Table(
    "users", metadata,
    Column("name", String(128), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("password_hash", String(256), nullable=True),  # argon2id PHC string; NULL: no password login
    Column("source", String(16), nullable=False, default="local"),  # local | ldap
    Column("created_at", Float, nullable=False),
    Column("disabled", Integer, nullable=False, default=0),
)

api_tokens = Table(
    "api_tokens", metadata,
    Column("id", String(16), primary_key=True),  # shown to the user to revoke it; not secret
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("user", String(128), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    Column("last_used_at", Float, nullable=True),
)

# Console sessions (engine/console/auth.py): the cookie holds a random token, only its SHA-256 is here.
console_sessions = Table(
    "console_sessions", metadata,
    Column("id_sha256", String(64), primary_key=True),
    Column("user", String(128), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # absolute end (session_max_hours after login)
    Column("peer", String(256), nullable=False, default=""),
)

# Failed console logins (engine/console/auth.py, LoginLimiter): one row per failure, shared by every
# engine on the database. No user name or address in clear: each is a keyed HMAC (blind term of the
# key file's message-index secret, scope "console.login"). ``user_key`` is NULL for a failure that
# counts against its address only (refused for its user name, or the user logged in since). Rows go
# once their window has passed (and the oldest beyond ``console.login.max_tracked``).
console_login_failures = Table(
    "console_login_failures", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("user_key", String(32), nullable=True),
    Column("addr_key", String(32), nullable=False),
    Index("ix_console_login_failures_user", "user_key", "at"),
    Index("ix_console_login_failures_addr", "addr_key", "at"),
    Index("ix_console_login_failures_at", "at"),
)
