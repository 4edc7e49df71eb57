"""`medrelay dicom find|move`: ask another archive (C-FIND) and have it send studies (C-MOVE), for operators.

The remote is given by address (``--host --port --called-aet``) or by AE title (``--remote``) from the
configuration: a ``dicom_prefetch`` destination's sources, or a DICOM listener's
``move_destinations``. Each query and retrieve is written to the configuration's audit trail
(Query / Instances Transferred, as the engine's own prefetch writes them), with the operator as
the actor and counts only. Identifiers the operator types are sent to the remote, never logged.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from engine.cli.main import _config_option, _load, _open_store, main

KEYS_HELP = ("matching or return key, repeatable: Keyword=value (matching) or Keyword (returned), e.g. "
             "-k PatientID=123 -k StudyDate=20200101- -k StudyInstanceUID")


def _actor() -> str:
    return os.environ.get("USER", "cli")


def _remote(settings: Any, name: str | None, host: str | None, port: int | None, called: str | None) -> Any:
    from engine.dimse.qr_scu import Remote

    if name:
        for ch in settings.channels.values():
            for r in ch.routes:
                for src in getattr(r.to, "sources", None) or []:
                    if getattr(src, "ae_title", None) == name:
                        return Remote(src.ae_title, src.host, src.port, src.tls, src.max_pdu, src.timeout)
            peer = (getattr(ch.source, "move_destinations", None) or {}).get(name)
            if peer is not None:
                return Remote(name, peer.host, peer.port, peer.tls, peer.max_pdu)
        click.echo(f"no remote AE {name!r} in the configuration (dicom_prefetch sources, move_destinations)",
                   err=True)
        sys.exit(2)
    if not (host and port and called):
        click.echo("give --remote AE, or --host, --port and --called-aet", err=True)
        sys.exit(2)
    return Remote(called, host, port)


def _connection(f: Any) -> Any:
    for opt in reversed([
        click.option("--remote", default=None, help="remote AE title from the configuration"),
        click.option("--host", default=None, help="remote host (instead of --remote)"),
        click.option("--port", type=click.IntRange(1, 65535), default=None, help="remote port"),
        click.option("--called-aet", default=None, help="remote AE title (with --host)"),
        click.option("--calling-aet", default="MEDRELAY", show_default=True,
                     help="our AE title (the remote's allow-list)"),
        click.option("--model", type=click.Choice(["study", "patient"]), default="study", show_default=True,
                     help="query/retrieve information model"),
        click.option("--level", type=click.Choice(["PATIENT", "STUDY", "SERIES", "IMAGE"]), default="STUDY",
                     show_default=True),
        click.option("-k", "--key", "keys", multiple=True, help=KEYS_HELP),
    ]):
        f = opt(f)
    return f


def _identifier(level: str, keys: tuple[str, ...]) -> Any:
    from engine.dimse.qr_scu import QRError, parse_keys

    try:
        ds = parse_keys(list(keys))
    except QRError as e:
        click.echo(f"dicom: {e}", err=True)
        sys.exit(2)
    ds.QueryRetrieveLevel = level
    return ds


@main.group()
def dicom() -> None:
    """Query another DICOM archive and have it send studies (Query/Retrieve SCU)."""
    import logging

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its failures are said once, in our words


@dicom.command("find")
@_config_option
@_connection
@click.option("--json", "as_json", is_flag=True, help="one JSON object per match (DICOM JSON model keywords)")
def dicom_find(config: str, remote: str | None, host: str | None, port: int | None, called_aet: str | None,
               calling_aet: str, model: str, level: str, keys: tuple[str, ...], as_json: bool) -> None:
    """C-FIND at a remote archive; prints each match's keys. Exit 1 when the remote answered with a
    failure status, 4 when it could not be reached or refused the association."""
    from engine.audit.trail import Audit
    from engine.dimse import qr_scu

    settings = _load(config, need_env=False)
    target = _remote(settings, remote, host, port, called_aet)
    query = _identifier(level, keys)
    store = _open_store(config, settings)
    peer = f"{target.host}:{target.port}"
    try:
        matches = qr_scu.find(target, calling_aet, query, model=model)  # type: ignore[arg-type]
    except qr_scu.QRError as e:
        Audit(store).record("dicom.scu.find", outcome="failure", actor=_actor(), peer=peer,
                            entity={"source": target.ae_title, "level": level}, detail=str(e)[:200])
        click.echo(f"dicom find: {e}", err=True)
        sys.exit(4 if isinstance(e, qr_scu.NoAssociation) else 1)
    Audit(store).record("dicom.scu.find", actor=_actor(), peer=peer,
                        entity={"source": target.ae_title, "level": level, "matches": len(matches)})
    names = [k.partition("=")[0].strip() for k in keys]
    for ds in matches:
        values = {n: _text(ds.get(n)) for n in names if n != "QueryRetrieveLevel"}
        if as_json:
            click.echo(json.dumps(values, ensure_ascii=False))
        else:
            click.echo("  ".join(f"{k}={v}" for k, v in values.items()))
    click.echo(f"{len(matches)} matches", err=True)


@dicom.command("move")
@_config_option
@_connection
@click.option("--dest", "destination", required=True, help="move destination AE title (known to the remote)")
def dicom_move(config: str, remote: str | None, host: str | None, port: int | None, called_aet: str | None,
               calling_aet: str, model: str, level: str, keys: tuple[str, ...], destination: str) -> None:
    """C-MOVE from a remote archive to an AE it knows. Exit 0 when every sub-operation succeeded, 1 when
    some failed (or a failure status), 4 when the remote could not be reached or refused the association."""
    from engine.audit.trail import Audit
    from engine.dimse import qr_scu

    settings = _load(config, need_env=False)
    target = _remote(settings, remote, host, port, called_aet)
    query = _identifier(level, keys)
    store = _open_store(config, settings)
    peer = f"{target.host}:{target.port}"
    try:
        got = qr_scu.move(target, calling_aet, query, destination, model=model)  # type: ignore[arg-type]
    except qr_scu.QRError as e:
        Audit(store).record("dicom.scu.move", outcome="failure", actor=_actor(), peer=peer,
                            entity={"source": target.ae_title, "destination": destination}, detail=str(e)[:200])
        click.echo(f"dicom move: {e}", err=True)
        sys.exit(4 if isinstance(e, qr_scu.NoAssociation) else 1)
    Audit(store).record("dicom.scu.move", outcome="success" if got.ok else "failure", actor=_actor(), peer=peer,
                        entity={"source": target.ae_title, "destination": destination, "completed": got.completed,
                                "failed": got.failed, "warning": got.warning})
    click.echo(f"status 0x{got.status:04X}: {got.completed} completed, {got.failed} failed, {got.warning} warnings")
    sys.exit(0 if got.ok else 1)


def _text(v: Any) -> str:
    if v is None:
        return ""
    value = v.value if hasattr(v, "value") else v
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(x) for x in value)
    return str(value)
