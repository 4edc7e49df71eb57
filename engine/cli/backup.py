"""`medrelay backup DEST`, `medrelay backup --verify DEST`, `medrelay restore SRC` (engine/ops/backup.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from engine.cli.main import _config_option, _load, _open_store, _reason, main
from engine.config import Settings


@main.command("backup")
@_config_option
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--verify", "verify_only", is_flag=True,
              help="check the backup at DEST (hashes, snapshot integrity, key ids) without restoring it")
@click.option("--kek-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="with --verify: also check this key file holds every key the backup needs")
def backup_cmd(config: str, dest: Path, verify_only: bool, kek_file: Path | None) -> None:
    """Back up the store and its blob files into the new or empty folder DEST, while the engine runs.

    The backup stays encrypted and does not contain the key file: back that up separately
    (see docs/deployment.md). DEST and everything in it are private (folders 0700, files 0600).
    Exit 0 done, 1 damaged backup (with --verify: a hash, the snapshot, a blob or the manifest
    itself), 4 cannot be done (DEST not empty, the store not reachable, a backup format this
    medrelay does not read, a key file that is not one).
    """
    from tqdm import tqdm

    from engine.audit.trail import Audit
    from engine.ops.backup import BackupError, DamagedBackup, backup, verify
    from engine.security.crypto import KeyRing

    if verify_only:
        try:
            keyring = KeyRing(kek_file) if kek_file is not None else None
            with tqdm(unit="blob", desc="verify", file=sys.stderr) as bar:
                problems = verify(dest, keyring=keyring, progress=bar.update)
        except BackupError as e:  # a damaged manifest is a damaged backup (1); another format cannot be read (4)
            click.echo(str(e), err=True)  # names DEST itself
            sys.exit(1 if isinstance(e, DamagedBackup) else 4)
        for p in problems:
            click.echo(f"{dest}: {p}", err=True)
        if problems:
            sys.exit(1)
        click.echo(f"{dest}: ok")
        return
    store = _open_store(config)
    try:
        with tqdm(unit="blob", desc="backup", file=sys.stderr) as bar:
            summary = backup(store, dest, progress=bar.update)
    except (BackupError, OSError) as e:
        click.echo(f"backup: {e if isinstance(e, BackupError) else _reason(e)}", err=True)
        sys.exit(4)
    Audit(store).record("store.backup", actor=os.environ.get("USER", "cli"),
                        detail=f"{summary.blobs} blob files, {summary.bytes} bytes")
    click.echo(f"{dest}: backup of the store with {summary.blobs} blob files ({summary.bytes} bytes); "
               "the key file is not in it: keep it backed up separately")


@main.command("restore")
@_config_option
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
def restore_cmd(config: str, src: Path) -> None:
    """Restore the backup SRC into CONFIG's store, which must be empty (no database, no blob files).

    The key file named by CONFIG must already be in place (copied from its own backup).
    Exit 0 restored, 4 cannot be done (a damaged backup included): then nothing is changed,
    and a database file or blob folders the attempt had created are removed again.
    """
    from tqdm import tqdm

    from engine.ops.backup import BackupError, restore, undo_created
    from engine.security.crypto import KeyRing
    from engine.store.db import Store

    settings = _load(config, need_env=False)
    kek = settings.resolve(settings.keys.kek_file)
    if not kek.exists():
        click.echo(f"restore: the key file {kek} is missing: copy it from its own backup first "
                   "(a new one cannot read the restored data)", err=True)
        sys.exit(4)
    keyring = KeyRing(kek)
    store = None
    try:
        with undo_created(_restore_targets(settings)):  # a failed restore leaves no empty db or blob folders
            try:
                store = Store(settings.store_url(), settings.blob_files(), keyring,
                              inline_max=settings.store.inline_max_bytes)
                with tqdm(unit="blob", desc="restore", file=sys.stderr) as bar:
                    summary = restore(src, store, progress=bar.update)
            except BaseException:
                if store is not None:
                    store.dispose()  # closed before its files are removed
                raise
    except (BackupError, OSError) as e:
        click.echo(f"restore: {e if isinstance(e, BackupError) else _reason(e)}", err=True)
        sys.exit(4)
    store = _open_store(config, settings)  # migrates a backup taken by an older medrelay
    from engine.audit.trail import Audit

    Audit(store).record("store.restore", actor=os.environ.get("USER", "cli"), detail=f"from a backup, "
                        f"{summary.blobs} blob files")
    click.echo(f"restored {summary.blobs} blob files and the database from {src}")


def _restore_targets(settings: Settings) -> list[Path]:
    """What a restore may create locally: the SQLite file and its companions, the blob folder."""
    from sqlalchemy.engine import make_url

    out: list[Path] = []
    url = make_url(settings.store_url())
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db = Path(str(url.database))
        out += [db, *(db.with_name(db.name + sfx) for sfx in ("-wal", "-shm", "-journal", ".migrate.lock"))]
    blobs = settings.store.blobs
    if not blobs.startswith("s3://"):
        out.append(settings.resolve(blobs))
    return out
