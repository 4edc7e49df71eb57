"""`medrelay users add|role|list|token|revoke|tokens`: the operators of the admin API and console."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime

import click

from engine.cli.main import _config_option, _open_store, main


def _actor() -> str:
    return os.environ.get("USER", "cli")


def _fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(2)


@main.group()
def users() -> None:
    """Users and API tokens of the admin API and console (roles: viewer, operator, admin)."""


@users.command("add")
@_config_option
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True)
@click.option("--password-stdin", is_flag=True, help="read the password from standard input (scripts)")
@click.option("--no-password", is_flag=True, help="token-only user (no console login)")
def users_add(config: str, name: str, role: str, password_stdin: bool, no_password: bool) -> None:
    """Add a user; the password is prompted (twice) unless given on stdin. There is no default user."""
    from engine.audit.trail import Audit
    from engine.auth.users import AuthError, add_user

    if no_password:
        password = None
    elif password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    store = _open_store(config)
    try:
        add_user(store, name, role, password)
    except AuthError as e:
        _fail(f"users add: {e}")
    Audit(store).record("user.add", actor=_actor(), detail=f"user {name} role {role}")
    click.echo(f"user {name} added with role {role}")


@users.command("role")
@_config_option
@click.argument("name")
@click.argument("role", type=click.Choice(["viewer", "operator", "admin"]))
def users_role(config: str, name: str, role: str) -> None:
    """Change a user's role."""
    from engine.audit.trail import Audit
    from engine.auth.users import AuthError, set_role

    store = _open_store(config)
    try:
        set_role(store, name, role)
    except AuthError as e:
        _fail(f"users role: {e}")
    Audit(store).record("user.role", actor=_actor(), detail=f"user {name} role {role}")
    click.echo(f"user {name} now has role {role}")


@users.command("list")
@_config_option
def users_list(config: str) -> None:
    """List users and their roles."""
    from engine.auth.users import list_users

    for u in list_users(_open_store(config)):
        state = " (disabled)" if u["disabled"] else ""
        click.echo(f"{u['name']}  {u['role']}  {u['source']}{state}")


@users.command("token")
@_config_option
@click.argument("name")
def users_token(config: str, name: str) -> None:
    """Issue an API token for NAME and print it once (only its hash is stored)."""
    from engine.audit.trail import Audit
    from engine.auth.users import AuthError, issue_token

    store = _open_store(config)
    try:
        tid, token = issue_token(store, name)
    except AuthError as e:
        _fail(f"users token: {e}")
    Audit(store).record("user.token", actor=_actor(), detail=f"user {name} token {tid}")
    click.echo(f"token {tid} for {name} (shown once; revoke with `medrelay users revoke {tid}`):", err=True)
    click.echo(token)


@users.command("tokens")
@_config_option
@click.argument("name", required=False)
def users_tokens(config: str, name: str | None) -> None:
    """List API tokens (ids, owners, when made, revoked, last used); never the tokens."""
    from engine.auth.users import list_tokens

    def when(ts: float | None) -> str:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else "-"

    for t in list_tokens(_open_store(config), name):
        click.echo(f"{t['id']}  {t['user']}  made {when(t['created_at'])}  used {when(t['last_used_at'])}"
                   f"{'  REVOKED ' + when(t['revoked_at']) if t['revoked_at'] else ''}")


@users.command("revoke")
@_config_option
@click.argument("token_id")
def users_revoke(config: str, token_id: str) -> None:
    """Revoke an API token by its id (from `users tokens`)."""
    from engine.audit.trail import Audit
    from engine.auth.users import revoke_token

    store = _open_store(config)
    if not revoke_token(store, token_id):
        _fail(f"users revoke: no active token {token_id}")
    Audit(store).record("user.revoke", actor=_actor(), detail=f"token {token_id}")
    click.echo(f"token {token_id} revoked")
