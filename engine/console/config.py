"""`console:` the admin API and operator console listener (docs/console.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.components import field_of
from engine.http.limits import HttpLimitsConfig
from engine.security.tls import TLSConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoginLimits(_Strict):
    """Failed logins allowed before further attempts are refused (429) for a while.

    Counted in the store, so every engine on one database shares the counts and a restart keeps them.
    """

    per_user: int = Field(5, ge=1, description="failed logins of one user name within `window` seconds")
    per_address: int = Field(20, ge=1, description="failed logins from one client address within `window`")
    window: float = Field(900.0, gt=0, description="seconds a failed login counts against its user and address")
    max_tracked: int = Field(10000, ge=100, description="failed logins kept in the store at most (oldest "
                             "forgotten first; each goes anyway once its window has passed), so a flood of "
                             "made-up names cannot grow the table")


class SearchLimits(_Strict):
    """Bounds of content search (`q`), which decrypts payloads."""

    max_rows: int = Field(5000, ge=1, description="messages decrypted and searched for one page at most")
    max_seconds: float = Field(5.0, gt=0, description="seconds one page of content search may take")


class LdapGroupRole(_Strict):
    group: str = Field(..., description="DN of an LDAP group (member or memberOf), e.g. "
                       "cn=pacs-admins,ou=groups,dc=example,dc=org")
    role: str = Field(..., pattern=r"^(viewer|operator|admin)$", description="role its members get")


class LdapConfig(_Strict):
    """LDAP / Active Directory bind as a second source of console users.

    A login that does not match a local user with a password is tried as an LDAP bind:
    the user's DN is found by a search (service account `bind_dn`, or anonymous), the
    password is checked by binding as that DN, and the role is the highest of the
    `groups` the user belongs to (no matching group: refused). LDAP users are recorded
    with source `ldap` and their role refreshed at every login.
    """

    url: str = Field(..., description="ldap://host:389 or ldaps://host:636")
    start_tls: bool = Field(False, description="upgrade an ldap:// connection with StartTLS")
    ca: str | None = Field(None, description="PEM CA bundle to verify the server (ldaps or StartTLS)")
    bind_dn: str | None = Field(None, description="service account DN for the user search (unset: anonymous)")
    bind_password: str | None = Field(None, description="its password, as ${ENV} or ${file:...}",
                                      json_schema_extra={"secret": True})
    user_base: str = Field(..., description="search base of users, e.g. ou=people,dc=example,dc=org")
    user_filter: str = Field("(uid={username})", description="filter finding a user; AD: "
                             "(sAMAccountName={username}); {username} is escaped (RFC 4515)")
    group_base: str | None = Field(None, description="search base of groups holding `member` (unset: read the "
                                   "user's memberOf attribute instead, as Active Directory keeps it)")
    groups: list[LdapGroupRole] = Field(default_factory=list, description="group DN -> role; the highest wins")
    timeout: float = Field(5.0, gt=0, description="seconds for connecting and for each LDAP operation")


class ConsoleConfig(_Strict, HttpLimitsConfig):
    """`console:` the operator console (UI at /) and admin API (JSON under /api)."""

    host: str = Field("127.0.0.1", description="address to bind; loopback unless told otherwise")
    port: int = Field(8090, ge=0, le=65535, description="TCP port (0: pick a free one, for tests)")
    tls: TLSConfig | None = Field(None, description="serve HTTPS with these cert/key (BCP 195 settings); the "
                                  "session cookie is then marked Secure")
    session_idle_minutes: float = Field(30.0, gt=0, description="a console session ends after this long unused")
    session_max_hours: float = Field(12.0, gt=0, description="and at the latest this long after login")
    login: LoginLimits = Field(default_factory=LoginLimits, description="failed-login rate limit")
    search: SearchLimits = Field(default_factory=SearchLimits, description="content search (`q`) bounds")
    ldap: LdapConfig | None = Field(None, description="LDAP / Active Directory users (in addition to local ones)")
    max_connections: int = field_of(HttpLimitsConfig, "max_connections", default=100)
    idle_timeout: float = field_of(HttpLimitsConfig, "idle_timeout", default=15.0)
    reindex_pause: float = Field(0.5, ge=0, description="seconds between background batches that fill in the "
                                 "blind index of messages stored before it existed")

    @model_validator(mode="after")
    def _tls_has_files(self) -> ConsoleConfig:
        if self.tls is not None and not (self.tls.cert and self.tls.key):
            raise ValueError("console.tls needs cert and key")
        return self
