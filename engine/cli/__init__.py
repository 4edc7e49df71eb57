"""The ``medrelay`` command line: the outermost layer of the engine, which may use every room below.

``main`` defines the group and most commands (click). Command families with a module of their
own (``backup``: backup and restore; ``users``: users and API tokens; ``dicom``: find and move at
another archive) add themselves to it and
are imported here, so ``main`` below is the whole command line. ``casetest`` runs ``medrelay
test`` cases, ``docs`` renders the component reference from the registry, ``bulk_import`` is
``medrelay import`` (a client of a running engine). Commands parse arguments and print; what
they compute lives in the rooms below (``engine.messages`` for listings, ``engine.store`` for
gc and key rotation, ``engine.ops`` for backups, ``engine.auth`` for users), so that an API or
console can call the same code.
"""

from engine.cli import backup as _backup  # noqa: F401  (adds `backup` and `restore`)
from engine.cli import dicom as _dicom  # noqa: F401  (adds `dicom find|move`)
from engine.cli import users as _users  # noqa: F401  (adds `users`)
from engine.cli.main import main

__all__ = ["main"]
