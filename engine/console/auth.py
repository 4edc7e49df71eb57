"""Who is asking: API tokens, console sessions, CSRF tokens and the login rate limit.

Every request is authenticated, one of two ways:

- ``Authorization: Bearer mrt_...``: an API token of engine/auth (stored as SHA-256). Not an
  ambient credential (a browser never adds it on its own), so it needs no CSRF token;
- the console's session cookie ``medrelay_session``: 32 random bytes, HttpOnly,
  SameSite=Strict, Secure when the console serves TLS, Path=/. Only its SHA-256 is stored
  (``console_sessions``), with an idle and an absolute expiry; logout deletes the row. Every
  POST made with the cookie must carry the session's CSRF token (``X-CSRF-Token`` header
  or a ``csrf`` field of the form or JSON body, one check for all: ``csrf_passes``): an
  HMAC of the session token, so it needs no storage and cannot be computed without the
  cookie. The login form has its own double-submit token (a cookie and a hidden field that
  must agree) against login CSRF.

Failed logins are audited (``console.login`` failure, the user name tried and the client
address) and limited per user name and per client address (``LoginLimiter``: a sliding
window of failure times). While limited, a login is refused with 429 before its password is
checked, so the limit also bounds the argon2 work an attacker can cause. A login refused for
its user name counts as a failure of its address, and a success clears only its own user
name's count, so the per-address limit holds for its whole window whatever names are tried.
The counts live in the store (``console_login_failures``, names and addresses as keyed
HMACs): every engine on one database shares them, and a restart keeps them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import delete, insert, literal_column, select, union_all, update

from engine.auth.tables import console_login_failures, console_sessions, users
from engine.auth.users import User, get_user, user_for_token, verify_password
from engine.console.config import ConsoleConfig, LoginLimits
from engine.security import blind_index
from engine.store import message_terms

log = structlog.get_logger()

SESSION_COOKIE = "medrelay_session"
LOGIN_CSRF_COOKIE = "medrelay_login_csrf"
TOUCH_EVERY = 60.0  # seconds between last_seen updates of one session
PRUNE_EVERY = 60.0  # seconds between one process's deletes of expired failed-login rows
LOGIN_SCOPE = "console.login"  # blind-term scope of the failed-login keys


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the user, how it authenticated, and (sessions) its CSRF token."""

    user: User
    via: str  # "token" | "session"
    csrf: str | None = None


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_for(session_token: str) -> str:
    return hmac.new(session_token.encode(), b"medrelay console csrf", hashlib.sha256).hexdigest()[:40]


CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"


def csrf_passes(principal: Principal, headers: Any, fields: Any) -> bool:
    """The one CSRF check of every POST, API and pages alike, so no route can take other ways.

    Bearer calls need none. A session's POST carries its token as the ``X-CSRF-Token`` header
    or as the ``csrf`` field of its body (the pages' form, the API's JSON object): the header
    when it is sent, else the field, never both tried, so a wrong header is a 403 whatever the
    field says. ``fields`` is anything with ``get`` (a parsed form or JSON object).
    """
    if principal.via != "session":
        return True
    given = headers.get(CSRF_HEADER) or fields.get(CSRF_FIELD)
    return (isinstance(given, str) and bool(given) and principal.csrf is not None
            and hmac.compare_digest(principal.csrf.encode(), given.encode()))


class Sessions:
    def __init__(self, store: Any, config: ConsoleConfig) -> None:
        self.store = store
        self.idle = config.session_idle_minutes * 60.0
        self.max_age = config.session_max_hours * 3600.0

    def create(self, user: User, peer: str) -> str:
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self.store.engine.begin() as conn:
            conn.execute(delete(console_sessions).where(console_sessions.c.expires_at < now))  # tidy up
            conn.execute(insert(console_sessions).values(id_sha256=_sha(token), user=user.name, created_at=now,
                                                         last_seen=now, expires_at=now + self.max_age,
                                                         peer=peer[:256]))
        return token

    def lookup(self, token: str) -> User | None:
        s, u = console_sessions, users
        now = time.time()
        digest = _sha(token)
        with self.store.engine.connect() as conn:
            r = conn.execute(select(s.c.last_seen, s.c.expires_at, u.c.name, u.c.role, u.c.source)
                             .select_from(s.join(u, u.c.name == s.c.user))
                             .where(s.c.id_sha256 == digest, u.c.disabled == 0)).first()
        if r is None or r.expires_at < now or r.last_seen + self.idle < now:
            return None
        if now - r.last_seen > TOUCH_EVERY:
            with self.store.engine.begin() as conn:
                conn.execute(update(s).where(s.c.id_sha256 == digest).values(last_seen=now))
        return User(r.name, r.role, r.source)

    def end(self, token: str) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(delete(console_sessions).where(console_sessions.c.id_sha256 == _sha(token)))


def authenticate(store: Any, sessions: Sessions, headers: Any, cookies: Any) -> Principal | None:
    """The caller of one request, or None (blocking: call from a thread)."""
    auth = headers.get("authorization", "")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        user = user_for_token(store, token.strip())
        return Principal(user, "token") if user is not None else None
    token = cookies.get(SESSION_COOKIE)
    if token:
        user = sessions.lookup(token)
        if user is not None:
            return Principal(user, "session", csrf_for(token))
    return None


def _user_key(user: str) -> str:
    """The limiter's key for a user name: a directory (AD, OpenLDAP) matches "Admin", "ADMIN" and
    "admin " as one account, so they share one count instead of five tries each."""
    return user.strip().casefold()


class LoginLimiter:
    """Sliding-window counts of failed logins per user name and per client address, in the store.

    One row per failed login in ``console_login_failures``, so every engine on one database counts
    the same failures (N engines behind a balancer do not give N times the tries) and a restart
    forgets none. The user name and the address are kept as keyed HMACs (``_term``), never in
    clear. A login attempt reads once (``_recent``: the last ``per_user`` failures of its name and
    the last ``per_address`` of its address inside the window); a failure writes one row. Rows
    whose window has passed are deleted, and the oldest beyond ``max_tracked``, at most once per
    ``PRUNE_EVERY`` seconds per process, after a failure (only failures add rows).
    """

    def __init__(self, limits: LoginLimits, store: Any) -> None:
        self.limits = limits
        self.store = store
        self._secret: bytes | None = None
        self._pruned_at = -PRUNE_EVERY  # monotonic time of this process's last prune

    def _term(self, kind: str, text: str) -> str:
        if self._secret is None:
            # the key file's message-index secret, which every engine of a deployment already shares
            # (keys init); the scope keeps these terms unrelated to the message index's own
            self._secret = self.store.keyring.hmac_key(message_terms.HMAC_KEY_NAME)
        return blind_index.term(self._secret, LOGIN_SCOPE, kind, text)

    def _keys(self, user: str, addr: str) -> tuple[str, str]:
        return self._term("user", _user_key(user)), self._term("addr", addr)

    def _recent(self, user_key: str, addr_key: str, now: float) -> tuple[list[float], list[float]]:
        """The times of the user name's last ``per_user`` and the address's last ``per_address``
        failures inside the window: one statement."""
        t, since = console_login_failures, now - self.limits.window
        by_user = (select(t.c.at).where(t.c.user_key == user_key, t.c.at > since)
                   .order_by(t.c.at.desc()).limit(self.limits.per_user).subquery())
        by_addr = (select(t.c.at).where(t.c.addr_key == addr_key, t.c.at > since)
                   .order_by(t.c.at.desc()).limit(self.limits.per_address).subquery())
        q = union_all(select(literal_column("'u'").label("k"), by_user.c.at),
                      select(literal_column("'a'").label("k"), by_addr.c.at))
        with self.store.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [r.at for r in rows if r.k == "u"], [r.at for r in rows if r.k == "a"]

    def _wait(self, times: list[float], cap: int, now: float) -> float | None:
        """Locked while ``cap`` failures are inside the window: until the oldest of the last ``cap`` leaves it."""
        return min(times) + self.limits.window - now if len(times) >= cap else None

    def retry_after(self, user: str, addr: str, now: float | None = None) -> float | None:
        """Seconds until a login for ``user`` from ``addr`` may be tried again, or None."""
        now = time.time() if now is None else now
        users_at, addrs_at = self._recent(*self._keys(user, addr), now)
        waits = [w for w in (self._wait(users_at, self.limits.per_user, now),
                             self._wait(addrs_at, self.limits.per_address, now)) if w is not None]
        return max(waits) if waits else None

    def admit(self, user: str, addr: str, now: float | None = None) -> float | None:
        """Before a password is checked: None to go on, else the seconds to wait (429). Blocking.

        An attempt refused because its *user name* is limited is still a failed login of its
        *address*: it counts there. Before, 25 tries at one name from one address left the
        address at 5 failures (the other 20 were refused, not counted), so that address could
        go on to log in as, or guess, any other user inside the window. An attempt refused
        because the address itself is limited adds nothing: the address's window runs from its
        failures and is not stretched by a client that keeps trying.
        """
        now = time.time() if now is None else now
        user_key, addr_key = self._keys(user, addr)
        users_at, addrs_at = self._recent(user_key, addr_key, now)
        user_wait = self._wait(users_at, self.limits.per_user, now)
        addr_wait = self._wait(addrs_at, self.limits.per_address, now)
        if user_wait is not None and addr_wait is None:
            self._record(None, addr_key, now)
            addr_wait = self._wait(sorted([now, *addrs_at], reverse=True)[:self.limits.per_address],
                                   self.limits.per_address, now)
        waits = [w for w in (user_wait, addr_wait) if w is not None]
        return max(waits) if waits else None

    def _record(self, user_key: str | None, addr_key: str, now: float) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(insert(console_login_failures).values(at=now, user_key=user_key, addr_key=addr_key))
        if time.monotonic() - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = time.monotonic()
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Rows whose window has passed, then the oldest beyond ``max_tracked``. Its own transaction
        after the failure's commit: a prune that fails (another engine pruning the same rows) is
        logged and tried again later, and the failure stays counted."""
        t = console_login_failures
        newest_kept = (select(t.c.at).order_by(t.c.at.desc()).offset(self.limits.max_tracked).limit(1)
                       .scalar_subquery())
        try:
            with self.store.engine.begin() as conn:
                conn.execute(delete(t).where(t.c.at <= now - self.limits.window))
                conn.execute(delete(t).where(t.c.at <= newest_kept))
        except Exception as e:
            log.warning("console.login_prune_failed", error=type(e).__name__)

    def failed(self, user: str, addr: str, now: float | None = None) -> None:
        """One failed login of ``user`` from ``addr`` (blocking: one insert)."""
        now = time.time() if now is None else now
        self._record(*self._keys(user, addr), now)

    def succeeded(self, user: str) -> None:
        """Clears the count of this user name only: the address's failures stand for their window
        (one account the client knows the password of must not buy it fresh guesses at others)."""
        user_key = self._term("user", _user_key(user))
        with self.store.engine.begin() as conn:
            conn.execute(update(console_login_failures).where(console_login_failures.c.user_key == user_key)
                         .values(user_key=None))


def check_password(store: Any, ldap: Any, name: str, password: str) -> User | None:
    """A local user with a password first; otherwise the LDAP directory, when configured."""
    if not name or len(name) > 128 or not password or len(password) > 1024:
        return None
    user = verify_password(store, name, password)
    if user is not None:
        return user
    if ldap is None:
        return None
    local = get_user(store, name)
    if local is not None and local.source == "local":
        return None  # a local user is never shadowed by a directory entry of the same name
    return ldap.login(store, name, password)
