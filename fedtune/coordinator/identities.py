"""Operator identities: a name, a role, and either a scoped token or an Ed25519 public key.

They live in ``admins.json`` in the coordinator's state dir (mode 0600, replaced atomically and
fsync'd on every change). A token identity's token is shown once, when it is made; only its
sha256 is stored. A key identity stores its public key only; its calls are signed the way client
calls are (fedtune.crypto.requests). The state dir's own ``admin.token`` is not stored here: it
stays the coordinator's built-in admin, under the reserved name :data:`LEGACY_NAME`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedtune.coordinator.roles import Role, parse_role
from fedtune.errors import InvalidInput, NotFound, PreconditionFailed, StateConflict

IDENTITIES_FILE = "admins.json"
LEGACY_NAME = "admin.token"
TOKEN_PREFIX = "fto_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_FORMAT = 1
# One lock per file: two stores over the same state dir in one process still write in turn.
_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def key_id(raw_public_key: bytes) -> str:
    """How a key identity names itself on the wire: its raw Ed25519 public key, base64."""
    return base64.b64encode(raw_public_key).decode()


def fingerprint(raw_public_key: bytes) -> str:
    """A short, non-secret handle of a public key for listings and the audit log."""
    return "ed25519:" + hashlib.sha256(raw_public_key).hexdigest()[:16]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class AdminIdentity:
    """One operator identity as stored (no secret: a token's hash or a public key)."""

    name: str
    role: str
    kind: str  # "token" or "key"
    created: float
    created_by: str
    token_sha256: str = ""
    public_key: str = ""  # base64 of the raw Ed25519 key (= its key id)

    @property
    def level(self) -> Role:
        """The role as a :class:`Role`."""
        return parse_role(self.role)

    @property
    def key_fingerprint(self) -> str:
        """The public key's fingerprint, or '' for a token identity."""
        return fingerprint(base64.b64decode(self.public_key)) if self.public_key else ""


class IdentityStore:
    """The identities of one state dir. Thread-safe; re-reads the file when it changed on disk."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / IDENTITIES_FILE
        with _LOCKS_GUARD:
            self._lock = _LOCKS.setdefault(self.path.resolve(), threading.Lock())
        self._seen: tuple[int, int, int] | None = None
        self._by_name: dict[str, AdminIdentity] = {}

    # ------------------------------------------------------------------ reading
    def _load(self) -> dict[str, AdminIdentity]:
        """The identities on disk (cached until the file changes). Call with the lock held."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._by_name = None, {}
            return self._by_name
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                doc = json.loads(self.path.read_text())
                rows = [AdminIdentity(**row) for row in doc["identities"]]
            except (ValueError, KeyError, TypeError) as e:
                raise StateConflict(f"{self.path} is not a fedtune identities file ({e}): restore it from a "
                                    "backup or remove it (the state dir's admin.token still works)") from e
            self._by_name = {i.name: i for i in rows}
            self._seen = seen
        return self._by_name

    def list(self) -> list[AdminIdentity]:
        """Every identity, by name."""
        with self._lock:
            return sorted(self._load().values(), key=lambda i: i.name)

    def by_token(self, token: str) -> AdminIdentity | None:
        """The token identity ``token`` belongs to, if any."""
        wanted = _sha256(token)
        with self._lock:
            return next((i for i in self._load().values() if i.token_sha256 == wanted), None)

    def by_key_id(self, kid: str) -> AdminIdentity | None:
        """The key identity whose public key is ``kid`` (base64), if any."""
        with self._lock:
            return next((i for i in self._load().values() if i.public_key and i.public_key == kid), None)

    # ------------------------------------------------------------------ changes
    def add_token(self, name: str, role: Role, created_by: str) -> tuple[AdminIdentity, str]:
        """Adds a token identity. Returns it and its token (shown this once; only the hash is kept)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        ident = AdminIdentity(name, str(role), "token", time.time(), created_by, token_sha256=_sha256(token))
        self._add(ident)
        return ident, token

    def add_key(self, name: str, role: Role, raw_public_key: bytes, created_by: str) -> AdminIdentity:
        """Adds a key identity for a raw 32-byte Ed25519 public key."""
        if len(raw_public_key) != 32:
            raise InvalidInput(f"an Ed25519 public key is 32 bytes, got {len(raw_public_key)}")
        ident = AdminIdentity(name, str(role), "key", time.time(), created_by, public_key=key_id(raw_public_key))
        self._add(ident)
        return ident

    def remove(self, name: str) -> AdminIdentity:
        """Removes an identity; its token or key is refused from the next call on."""
        if name == LEGACY_NAME:
            raise InvalidInput(f"{LEGACY_NAME} is the state dir's own admin token, not an identity: to retire it, "
                               "stop the coordinator and replace the file")
        with self._lock:
            current = dict(self._load())
            gone = current.pop(name, None)
            if gone is None:
                raise NotFound(f"no identity named {name!r} (see `fedtune admin list`)")
            self._write(current)
        return gone

    def _add(self, ident: AdminIdentity) -> None:
        if ident.name == LEGACY_NAME or not _NAME.fullmatch(ident.name):
            raise InvalidInput(f"bad identity name {ident.name!r}: 1-64 letters, digits, '.', '_', '@' or '-', "
                               f"starting with a letter or digit, and not {LEGACY_NAME!r}")
        with self._lock:  # checked and written under one hold: two concurrent adds cannot both pass
            current = dict(self._load())
            twin = next((i for i in current.values() if ident.public_key and i.public_key == ident.public_key), None)
            if twin is not None:
                raise PreconditionFailed(f"this public key already belongs to {twin.name!r}: one key, one identity")
            if ident.name in current:
                raise PreconditionFailed(f"identity {ident.name!r} exists: `fedtune admin remove {ident.name}` first")
            current[ident.name] = ident
            self._write(current)

    def _write(self, identities: dict[str, AdminIdentity]) -> None:
        """Replaces the file atomically (write, fsync, rename, fsync the dir). Call with the lock held."""
        doc = {"format": _FORMAT, "identities": [asdict(i) for i in sorted(identities.values(), key=lambda i: i.name)]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._seen = None  # re-read (and re-stat) on the next lookup
