"""Envelope encryption for everything medrelay stores.

Every blob gets its own random 256-bit data key (AES-256-GCM, 96-bit random nonce);
the data key is wrapped with AES key wrap (RFC 3394) under a key-encryption key
(KEK) held in the key file. The GCM additional data binds a ciphertext to the id of
the message it belongs to, so a blob swapped between messages fails to decrypt.
Rotation adds a new KEK and re-wraps data keys only: the ciphertexts never move.

The key file is shared by the running engine and `medrelay keys rotate` in another
process. Every change is a locked read-modify-write (flock on ``<file>.lock``), and a
running engine notices a changed file by its stat (``refresh``): it then seals under
the new active key, and keeps KEKs removed from the file in memory, unwrap-only, so
nothing it holds in flight becomes unreadable.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

log = structlog.get_logger()

NONCE_BYTES = 12


class IntegrityError(Exception):
    """Ciphertext, wrapped key or binding is wrong: tampering, a swapped blob or the wrong key."""


class KeyFileError(IntegrityError, RuntimeError):
    """The key file cannot be read as one: every command that opens it says this one line (exit 4)."""


@dataclass(frozen=True, slots=True)
class Sealed:
    kek_id: str
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"))


def _parse_key_file(path: Path, raw: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The key file's JSON and its KEKs, or one ``KeyFileError`` naming what is wrong.

    The one reading of the file's shape, so ``run``, ``backup --verify --kek-file``, ``restore``
    and ``keys`` all refuse a malformed file with the same sentence instead of a ``KeyError``.
    """
    def bad(why: str) -> KeyFileError:
        return KeyFileError(f"{path}: not a medrelay key file ({why})")

    try:
        data = json.loads(raw)
    except ValueError:
        raise bad("not JSON") from None
    if not isinstance(data, dict):
        raise bad("not a JSON object")
    if not isinstance(data.get("keks"), dict) or not data["keks"]:
        raise bad("no keks")
    active = data.get("active")
    if not isinstance(active, str) or not active:
        raise bad("no active key")
    try:
        keks = {str(k): _unb64(v) for k, v in data["keks"].items()}
        if not isinstance(data.get("secrets", {}), dict):
            raise TypeError
        for v in data.get("secrets", {}).values():
            _unb64(v)
    except (TypeError, ValueError, AttributeError):
        raise bad("a key is not base64") from None
    if active not in keks:
        raise bad(f"active key {active!r} missing")
    return data, keks


class KeyRing:
    """The key file: KEKs by id (one active) and named HMAC secrets (e.g. for pseudonyms).

    Stored as JSON, mode 0600. Created on first use when absent, with a warning in the
    log: losing this file makes every stored message unreadable, so it is said loudly.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keks: dict[str, bytes] = {}
        self._active = ""
        self._secrets: dict[str, bytes] = {}
        self._retired: dict[str, bytes] = {}  # removed from the file by another process: unwrap only
        self._stat: tuple[int, int, int, int] | None = None
        if self.path.exists():
            self._load()
        else:
            with self._file_lock():
                if self.path.exists():  # another process created it while we waited
                    self._load()
                else:
                    self._create()

    # -- file handling -------------------------------------------------
    def _load(self) -> None:
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("keys.file_permissions", path=str(self.path), mode=oct(mode), want="0o600")
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            data, keks = _parse_key_file(self.path, f.read())
        for kid, kek in self._keks.items():  # retired elsewhere: keep for what is in flight here
            if kid not in keks:
                self._retired[kid] = kek
        self._keks = keks
        self._active = data["active"]
        self._secrets = {**self._secrets, **{k: _unb64(v) for k, v in data.get("secrets", {}).items()}}
        self._stat = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Serialise read-modify-write of the key file between processes (engine and CLI)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def refresh(self) -> bool:
        """Re-read the key file if another process changed it; cheap (one stat) when not.

        Returns True when it was re-read. Called by the store after every blob insert
        and when a data key names a KEK this process does not know yet.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        if (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size) == self._stat:
            return False
        with self._lock:
            self._load()
        log.info("keys.reloaded", active=self._active, keks=len(self._keks))
        return True

    def _write(self) -> None:
        data = {
            "active": self._active,
            "keks": {k: _b64(v) for k, v in self._keks.items()},
            "secrets": {k: _b64(v) for k, v in self._secrets.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        st = os.stat(self.path)
        self._stat = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _create(self) -> None:
        kid = self._new_kid()
        self._keks = {kid: AESGCM.generate_key(bit_length=256)}
        self._active = kid
        self._write()
        log.warning("keys.created", path=str(self.path), kek_id=kid,
                    note="new key-encryption key file; back it up, stored data is unreadable without it")

    @staticmethod
    def _new_kid() -> str:
        return "kek-" + secrets.token_hex(4)

    # -- keys ----------------------------------------------------------
    @property
    def active_id(self) -> str:
        return self._active

    def kek_ids(self) -> list[str]:
        """KEKs in the key file (not the unwrap-only ones another process retired)."""
        return list(self._keks)

    def secret_names(self) -> list[str]:
        """Names of the HMAC secrets in the key file (``medrelay keys init``); never their values."""
        return sorted(self._secrets)

    def in_file(self, kid: str) -> bool:
        return kid in self._keks

    def add_kek(self) -> str:
        """Add a new KEK and make it active; old ones stay until every blob is re-wrapped."""
        with self._lock, self._file_lock():
            self._load()  # never overwrite what another process wrote since we read
            kid = self._new_kid()
            self._keks[kid] = AESGCM.generate_key(bit_length=256)
            self._active = kid
            self._write()
        return kid

    def retire_kek(self, kid: str) -> None:
        with self._lock, self._file_lock():
            self._load()
            if kid == self._active:
                raise ValueError("cannot retire the active key")
            kek = self._keks.pop(kid, None)
            self._write()
            if kek is not None:
                self._retired[kid] = kek

    def hmac_key(self, name: str) -> bytes:
        """A stable 32-byte secret for keyed hashing (pseudonyms); created on first use."""
        key = self._secrets.get(name)
        if key is not None:
            return key
        with self._lock, self._file_lock():
            self._load()  # another process may have created it meanwhile: use theirs
            key = self._secrets.get(name)
            if key is None:
                key = secrets.token_bytes(32)
                self._secrets[name] = key
                self._write()
                log.info("keys.secret_created", name=name)
            return key

    # -- sealing -------------------------------------------------------
    def seal(self, plaintext: bytes, aad: str) -> Sealed:
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        ct = AESGCM(dek).encrypt(nonce, plaintext, aad.encode())
        kid = self._active
        kek = self._keks.get(kid) or self._retired[kid]  # a concurrent refresh may swap the dict
        return Sealed(kid, aes_key_wrap(kek, dek), nonce, ct)

    def new_data_key(self) -> tuple[str, bytes, bytes]:
        """A fresh data key for one blob: (kek id, wrapped key, the key), for chunked sealing
        (engine/security/stream.py) where the ciphertext is made piece by piece."""
        dek = AESGCM.generate_key(bit_length=256)
        kid = self._active
        kek = self._keks.get(kid) or self._retired[kid]
        return kid, aes_key_wrap(kek, dek), dek

    def unwrap(self, kek_id: str, wrapped_key: bytes) -> bytes:
        kek = self._keks.get(kek_id) or self._retired.get(kek_id)
        if kek is None and self.refresh():  # rotated by another process since we read the file
            kek = self._keks.get(kek_id) or self._retired.get(kek_id)
        if kek is None:
            raise IntegrityError(f"key {kek_id!r} is not in the key file")
        try:
            return aes_key_unwrap(kek, wrapped_key)
        except InvalidUnwrap as e:
            raise IntegrityError("wrapped data key does not unwrap: wrong or tampered key") from e

    def open(self, sealed: Sealed, aad: str) -> bytes:
        dek = self.unwrap(sealed.kek_id, sealed.wrapped_key)
        try:
            return AESGCM(dek).decrypt(sealed.nonce, sealed.ciphertext, aad.encode())
        except InvalidTag as e:
            raise IntegrityError("ciphertext failed authentication: tampered or swapped blob") from e

    def rewrap(self, kek_id: str, wrapped_key: bytes) -> tuple[str, bytes]:
        """Re-wrap one data key under the active KEK (rotation); the ciphertext stays as it is."""
        dek = self.unwrap(kek_id, wrapped_key)
        kid = self._active
        return kid, aes_key_wrap(self._keks.get(kid) or self._retired[kid], dek)
