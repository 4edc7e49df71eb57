"""LDAP / Active Directory as a second source of console users (ldap3).

A login is checked the way directory-backed web consoles do it: find the user's entry by a
search (as the service account, or anonymously), then bind as that entry with the password
given, which is the only check of the password (the directory's own policy: lockout,
expiry, disabled accounts, applies). The role is the highest one mapped from the user's
groups: groups holding a ``member``/``uniqueMember`` of the user under ``group_base``
(OpenLDAP ``groupOfNames``), or the entry's ``memberOf`` (Active Directory; OpenLDAP's
memberof overlay). No mapped group: no login. The user is then recorded in ``users`` with
source ``ldap`` and that role (refreshed at every login, so a change of groups takes effect
at the next one), which is what sessions and API tokens refer to.

An empty password is refused before any bind (an LDAP simple bind with a DN and no
password is an "unauthenticated bind" that many servers accept). The user name is
escaped for the search filter (RFC 4515). A directory that is down or slow fails the login
(``timeout`` for connect and each operation) and is logged; local users keep working.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import structlog
from sqlalchemy import insert, select, update

from engine.auth.tables import users
from engine.auth.users import ROLES, User
from engine.console.config import LdapConfig

log = structlog.get_logger()


def _dn(value: str) -> str:
    """A DN as compared here: case-folded, no spaces around separators."""
    return ",".join("=".join(p.strip() for p in rdn.split("=", 1)) for rdn in value.split(",")).casefold()


class Directory:
    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        self._roles = {_dn(g.group): g.role for g in config.groups}

    def _server(self) -> Any:
        from ldap3 import NONE, Server, Tls

        c = self.config
        tls = None
        if c.url.startswith("ldaps://") or c.start_tls:
            tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=c.ca, version=ssl.PROTOCOL_TLS_CLIENT)
        return Server(c.url, get_info=NONE, connect_timeout=max(1, round(c.timeout)), tls=tls)

    def _connection(self, server: Any, user: str | None, password: str | None) -> Any:
        """(ldap3 takes whole seconds for its socket timeouts.)"""
        from ldap3 import Connection

        conn = Connection(server, user=user, password=password, receive_timeout=max(1, round(self.config.timeout)),
                          raise_exceptions=False, read_only=True, auto_referrals=False)
        conn.open()
        if self.config.start_tls and not server.ssl:
            conn.start_tls()
        return conn

    def lookup(self, name: str, password: str) -> tuple[str, str] | None:
        """(user DN, role) when ``password`` binds as ``name``'s entry and a group maps to a role."""
        from ldap3 import BASE, SUBTREE
        from ldap3.utils.conv import escape_filter_chars

        c = self.config
        if not name or not password:
            return None
        server = self._server()
        svc = self._connection(server, c.bind_dn, c.bind_password)
        try:
            if not svc.bind():
                log.warning("console.ldap_service_bind_failed", result=svc.result.get("description"))
                return None
            svc.search(c.user_base, c.user_filter.format(username=escape_filter_chars(name)), SUBTREE,
                       attributes=["memberOf"], size_limit=2)
            entries = list(svc.entries)
            if len(entries) != 1:
                return None  # unknown, or ambiguous: never pick one of several
            dn = entries[0].entry_dn
            groups = [str(g) for g in entries[0]["memberOf"].values] if "memberOf" in entries[0] else []
            if c.group_base:
                target = escape_filter_chars(dn)
                svc.search(c.group_base, f"(|(member={target})(uniqueMember={target}))", SUBTREE, attributes=[])
                groups = [e.entry_dn for e in svc.entries]
        finally:
            svc.unbind()
        user = self._connection(server, dn, password)
        try:
            if not user.bind():
                return None
            user.search(dn, "(objectClass=*)", BASE, attributes=[])  # the bind really is this entry's
        finally:
            user.unbind()
        mapped = [self._roles[_dn(g)] for g in groups if _dn(g) in self._roles]
        if not mapped:
            log.info("console.ldap_no_role", user=name)
            return None
        return dn, max(mapped, key=ROLES.index)

    def login(self, store: Any, name: str, password: str) -> User | None:
        try:
            found = self.lookup(name, password)
        except Exception as e:  # directory down, TLS refused, timeout: this login fails, nothing else
            log.warning("console.ldap_unavailable", error=f"{type(e).__name__}: {str(e)[:200]}")
            return None
        if found is None:
            return None
        _, role = found
        with store.engine.begin() as conn:
            row = conn.execute(select(users.c.source, users.c.disabled).where(users.c.name == name)).first()
            if row is None:
                conn.execute(insert(users).values(name=name, role=role, source="ldap", created_at=time.time(),
                                                  password_hash=None))
            elif row.source != "ldap" or row.disabled:
                return None  # a local user, or one disabled here, is never taken over by the directory
            else:
                conn.execute(update(users).where(users.c.name == name).values(role=role))
        return User(name, role, "ldap")
