"""`medrelay users`: no default user, argon2id hashes, tokens stored hashed and revocable, roles ordered."""

import subprocess
import sys

from sqlalchemy import select

from engine.auth.tables import api_tokens, users
from engine.auth.users import User, add_user, issue_token, revoke_token, user_for_token, verify_password

CFG = """
store: {url: "sqlite:///data/m.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels: {}
"""


def cli(tmp, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=tmp, input=stdin, capture_output=True,
                          text=True, timeout=60)


def test_users_cli_add_token_revoke(tmp_path):
    (tmp_path / "channels.yaml").write_text(CFG)
    assert cli(tmp_path, "users", "list").stdout == ""  # no default user
    r = cli(tmp_path, "users", "add", "ann", "--role", "admin", "--password-stdin", stdin="short\n")
    assert r.returncode == 2 and "12 characters" in r.stderr
    r = cli(tmp_path, "users", "add", "ann", "--role", "admin", "--password-stdin",
            stdin="correct horse battery\n")
    assert r.returncode == 0, r.stderr
    r = cli(tmp_path, "users", "add", "ann", "--role", "viewer", "--no-password")
    assert r.returncode == 2 and "exists" in r.stderr
    r = cli(tmp_path, "users", "token", "ann")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("mrt_") and len(token) > 40
    db = (tmp_path / "data/m.db").read_bytes()
    assert token.encode() not in db and b"correct horse" not in db  # stored only as hashes
    listing = cli(tmp_path, "users", "tokens").stdout
    tid = listing.split()[0]
    assert token not in listing
    assert cli(tmp_path, "users", "revoke", tid).returncode == 0
    assert "REVOKED" in cli(tmp_path, "users", "tokens").stdout
    assert cli(tmp_path, "users", "revoke", tid).returncode == 2


def test_passwords_tokens_and_roles(sqlite_store):
    s = sqlite_store
    add_user(s, "olga", "operator", "a long enough secret")
    with s.engine.connect() as c:
        h = c.execute(select(users.c.password_hash)).scalar_one()
    assert h.startswith("$argon2id$")
    assert verify_password(s, "olga", "a long enough secret") == User("olga", "operator")
    assert verify_password(s, "olga", "a long enough secreT") is None
    assert verify_password(s, "nobody", "a long enough secret") is None
    tid, token = issue_token(s, "olga")
    u = user_for_token(s, token)
    assert u is not None and u.can("viewer") and u.can("operator") and not u.can("admin")
    assert user_for_token(s, token + "x") is None and user_for_token(s, "Bearer " + token) is None
    with s.engine.connect() as c:
        assert c.execute(select(api_tokens.c.token_sha256)).scalar_one() != token
    assert revoke_token(s, tid) and user_for_token(s, token) is None
