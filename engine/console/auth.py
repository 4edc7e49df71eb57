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
window of failure times in a bounded LRU map, so made-up names cannot grow memory). While
limited, a login is refused with 429 before its password is checked, so the limit also
bounds the argon2 work an attacker can cause. A login refused for its user name counts as a
failure of its address, and a success clears only its own user name's count, so the
per-address limit holds for its whole window whatever names are tried. The counts live in
the process: a restart forgets them, and engines behind one balancer count apart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update

from engine.auth.tables import console_sessions, users
from engine.auth.users import User, get_user, user_for_token, verify_password
from engine.console.config import ConsoleConfig, LoginLimits

SESSION_COOKIE = "medrelay_session"
LOGIN_CSRF_COOKIE = "medrelay_login_csrf"
TOUCH_EVERY = 60.0  # seconds between last_seen updates of one session


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
    """Sliding-window counts of failed logins per user name and per client address."""

    def __init__(self, limits: LoginLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._users: OrderedDict[str, deque[float]] = OrderedDict()
        self._addrs: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, table: OrderedDict[str, deque[float]], key: str, now: float) -> deque[float] | None:
        q = table.get(key)
        if q is None:
            return None
        while q and q[0] <= now - self.limits.window:
            q.popleft()
        if not q:
            del table[key]
            return None
        return q

    def retry_after(self, user: str, addr: str, now: float | None = None) -> float | None:
        """Seconds until a login for ``user`` from ``addr`` may be tried again, or None."""
        now = time.time() if now is None else now
        with self._lock:
            waits = [w for w in (self._wait(self._users, _user_key(user), self.limits.per_user, now),
                                 self._wait(self._addrs, addr, self.limits.per_address, now)) if w is not None]
            return max(waits) if waits else None

    def admit(self, user: str, addr: str, now: float | None = None) -> float | None:
        """Before a password is checked: None to go on, else the seconds to wait (429).

        An attempt refused because its *user name* is limited is still a failed login of its
        *address*: it counts there. Before, 25 tries at one name from one address left the
        address at 5 failures (the other 20 were refused, not counted), so that address could
        go on to log in as, or guess, any other user inside the window. An attempt refused
        because the address itself is limited adds nothing: the address's window runs from its
        failures and is not stretched by a client that keeps trying.
        """
        now = time.time() if now is None else now
        with self._lock:
            user_wait = self._wait(self._users, _user_key(user), self.limits.per_user, now)
            addr_wait = self._wait(self._addrs, addr, self.limits.per_address, now)
            if user_wait is not None and addr_wait is None:
                self._add(self._addrs, addr, self.limits.per_address, now)
                addr_wait = self._wait(self._addrs, addr, self.limits.per_address, now)
        waits = [w for w in (user_wait, addr_wait) if w is not None]
        return max(waits) if waits else None

    def _wait(self, table: OrderedDict[str, deque[float]], key: str, cap: int, now: float) -> float | None:
        q = self._recent(table, key, now)
        return q[0] + self.limits.window - now if q is not None and len(q) >= cap else None

    def _add(self, table: OrderedDict[str, deque[float]], key: str, cap: int, now: float) -> None:
        q = table.get(key)
        if q is None:
            q = table[key] = deque(maxlen=cap)
        table.move_to_end(key)
        q.append(now)
        while len(table) > self.limits.max_tracked:
            table.popitem(last=False)

    def failed(self, user: str, addr: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self._add(self._users, _user_key(user), self.limits.per_user, now)
            self._add(self._addrs, addr, self.limits.per_address, now)

    def succeeded(self, user: str) -> None:
        """Clears the count of this user name only: the address's failures stand for their window
        (one account the client knows the password of must not buy it fresh guesses at others)."""
        with self._lock:
            self._users.pop(_user_key(user), None)

    def tracked(self) -> int:
        return len(self._users) + len(self._addrs)


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
