"""LDAP users of the console against a real OpenLDAP slapd (Debian's) that the test configures
and starts in a temp dir on 127.0.0.1: search then bind, group-to-role mapping by groupOfNames
members and by memberOf (the memberof overlay, as Active Directory keeps it), refusals (wrong
password, empty password, no mapped group, a filter-injection user name, a local user's name),
the role refreshed at the next login, and a directory that is down failing only LDAP logins."""

from __future__ import annotations

import socket
import subprocess
import textwrap
import time

import pytest
from conftest import free_port, need_tool
from console_support import PASSWORD, YAML, login
from mllp_peers import MLLPReceiver

from engine.auth.users import add_user
from engine.console.config import LdapConfig
from engine.console.ldap import Directory

SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "slapd-root-secret"
USERS = {"jdoe": "ldap-secret-jdoe", "asmith": "ldap-secret-asmith", "nogroup": "ldap-secret-nogroup",
         "mixed": "ldap-secret-mixed"}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    need_tool("/usr/sbin/slapd")
    need_tool("/usr/sbin/slapadd")
    d = tmp_path_factory.mktemp("slapd")
    (d / "db").mkdir()
    conf = d / "slapd.conf"
    conf.write_text(textwrap.dedent(f"""\
        include /etc/ldap/schema/core.schema
        include /etc/ldap/schema/cosine.schema
        include /etc/ldap/schema/inetorgperson.schema
        include /etc/ldap/schema/nis.schema
        pidfile {d}/slapd.pid
        modulepath /usr/lib/ldap
        moduleload back_mdb
        moduleload memberof
        database mdb
        suffix "{SUFFIX}"
        rootdn "{ROOT_DN}"
        rootpw {ROOT_PW}
        directory {d}/db
        overlay memberof
        """))
    people = "".join(f"\ndn: uid={u},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: {u}\ncn: {u}\nsn: {u}\n"
                     f"userPassword: {pw}\n" for u, pw in USERS.items())
    (d / "base.ldif").write_text(f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\n"
                                 f"dc: example\n\ndn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n"
                                 f"\ndn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n{people}")
    subprocess.run(["/usr/sbin/slapadd", "-f", str(conf), "-l", str(d / "base.ldif")], check=True,
                   capture_output=True)
    port = free_port()
    log = open(d / "slapd.log", "wb")
    proc = subprocess.Popen(["/usr/sbin/slapd", "-f", str(conf), "-h", f"ldap://127.0.0.1:{port}/", "-d", "0"],
                            stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError((d / "slapd.log").read_text()[-2000:]) from None
            time.sleep(0.1)
    # groups through the server (not slapadd), so the memberof overlay fills in memberOf
    from ldap3 import MODIFY_REPLACE, Connection, Server

    admin = Connection(Server(f"ldap://127.0.0.1:{port}"), ROOT_DN, ROOT_PW, auto_bind=True)
    for cn, members in (("pacs-admins", ["jdoe", "mixed"]), ("ris-viewers", ["asmith", "mixed"]),
                        ("unmapped", ["nogroup"])):
        assert admin.add(f"cn={cn},ou=groups,{SUFFIX}", "groupOfNames",
                         {"cn": cn, "member": [f"uid={m},ou=people,{SUFFIX}" for m in members]}), admin.result

    class Slapd:
        url = f"ldap://127.0.0.1:{port}"

        def members(self, cn: str, users: list[str]) -> None:
            assert admin.modify(f"cn={cn},ou=groups,{SUFFIX}",
                                {"member": [(MODIFY_REPLACE, [f"uid={u},ou=people,{SUFFIX}" for u in users])]})

    yield Slapd()
    admin.unbind()
    proc.terminate()
    proc.wait(10)
    log.close()


def ldap_block(url: str, *, group_base: bool = True) -> str:
    return (f", ldap: {{url: \"{url}\", bind_dn: \"{ROOT_DN}\", bind_password: \"${{LDAP_PW}}\", "
            f"user_base: \"ou=people,{SUFFIX}\"" + (f", group_base: \"ou=groups,{SUFFIX}\"" if group_base else "")
            + f", groups: [{{group: \"cn=pacs-admins,ou=groups,{SUFFIX}\", role: admin}}, "
              f"{{group: \"CN=ris-viewers, OU=groups, DC=example, DC=org\", role: viewer}}], timeout: 3}}")


def test_ldap_login_roles_refusals_and_refresh(engine_factory, slapd):
    rx = MLLPReceiver().start()
    try:
        eng = engine_factory(YAML.format(rx=rx.port, store_url="sqlite:///data/m.db", extra=ldap_block(slapd.url)),
                             env={"LDAP_PW": ROOT_PW})
        host, port = eng.runtime.console.address
        base = f"http://{host}:{port}"
        add_user(eng.store, "localop", "operator", PASSWORD)

        c, r = login(base, "jdoe", USERS["jdoe"])
        assert r.status_code == 303 and r.headers["location"] == "/"
        me = c.get("/api/me").json()
        assert (me["user"], me["role"], me["source"]) == ("jdoe", "admin", "ldap")
        c, _ = login(base, "mixed", USERS["mixed"])  # in two mapped groups: the higher role
        assert c.get("/api/me").json()["role"] == "admin"
        c, _ = login(base, "asmith", USERS["asmith"])  # a DN written with other case and spaces still maps
        assert c.get("/api/me").json()["role"] == "viewer"
        for user, pw in (("jdoe", "wrong-password"), ("jdoe", ""), ("nogroup", USERS["nogroup"]),
                         ("*", USERS["jdoe"]), ("jdoe)(uid=*", USERS["jdoe"]), ("nobody", "whatever-pass")):
            _, r = login(base, user, pw)
            assert r.status_code == 303 and "failed=1" in r.headers["location"], (user, pw)
        _, r = login(base, "localop", PASSWORD)  # local users keep working beside the directory
        assert r.status_code == 303 and r.headers["location"] == "/"

        # a change of groups takes effect at the next login
        slapd.members("pacs-admins", ["mixed"])
        slapd.members("ris-viewers", ["asmith", "mixed", "jdoe"])
        c, _ = login(base, "jdoe", USERS["jdoe"])
        assert c.get("/api/me").json()["role"] == "viewer"
    finally:
        rx.stop()


def test_member_of_mode_and_a_directory_that_is_down(slapd):
    cfg = LdapConfig(url=slapd.url, bind_dn=ROOT_DN, bind_password=ROOT_PW, user_base=f"ou=people,{SUFFIX}",
                     groups=[{"group": f"cn=pacs-admins,ou=groups,{SUFFIX}", "role": "admin"},
                             {"group": f"cn=ris-viewers,ou=groups,{SUFFIX}", "role": "viewer"}])
    d = Directory(cfg)  # no group_base: the entry's memberOf (the overlay keeps it, as AD does)
    assert d.lookup("asmith", USERS["asmith"]) == (f"uid=asmith,ou=people,{SUFFIX}", "viewer")
    assert d.lookup("asmith", "wrong") is None and d.lookup("nogroup", USERS["nogroup"]) is None
    down = Directory(cfg.model_copy(update={"url": f"ldap://127.0.0.1:{free_port()}", "timeout": 1}))

    class NoStore:  # never reached: the bind fails first
        engine = None

    started = time.monotonic()
    assert down.login(NoStore(), "asmith", USERS["asmith"]) is None
    assert time.monotonic() - started < 10
