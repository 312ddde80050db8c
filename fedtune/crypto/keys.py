"""Key files: private keys kept as PEM with mode 0600, created on first use."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.errors import InvalidInput

K = TypeVar("K", Ed25519PrivateKey, X25519PrivateKey)


def load_or_create(path: Path, kind: type[K]) -> K:
    """Loads a private key from ``path`` or creates it there (0600, written atomically)."""
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as e:
            raise InvalidInput(f"{path} is not a PEM private key: {e}") from e
        if not isinstance(key, kind):
            raise InvalidInput(f"{path} holds a {type(key).__name__}, expected {kind.__name__}")
        return key
    key = kind.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key


def raw_public_bytes(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    """32 raw bytes of the public half."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ed25519_public(raw: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from 32 raw bytes."""
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise InvalidInput(f"not an Ed25519 public key: {e}") from e


def read_ed25519_private(path: Path) -> Ed25519PrivateKey:
    """An existing Ed25519 private key file: PEM (``openssl genpkey -algorithm ed25519``) or OpenSSH
    (``ssh-keygen -t ed25519 -N ''``), unencrypted.

    Raises:
        InvalidInput: missing, unreadable, encrypted, or not an Ed25519 key.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read key file {path}: {e.strerror}") from e
    key: object
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{path} is not an unencrypted PEM or OpenSSH private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInput(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
    return key


def read_ed25519_public(path: Path) -> bytes:
    """The 32 raw bytes of an Ed25519 public key file: PEM (``openssl pkey -pubout``), an OpenSSH
    line (``ssh-ed25519 AAAA...``) or the raw key in base64.

    Raises:
        InvalidInput: missing, unreadable, or not an Ed25519 public key.
    """
    try:
        data = path.read_bytes().strip()
    except OSError as e:
        raise InvalidInput(f"cannot read public key file {path}: {e.strerror}") from e
    if b"PRIVATE KEY" in data:
        raise InvalidInput(f"{path} is a private key: pass its public half (openssl pkey -in KEY -pubout)")
    key: object
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        elif data.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data)
        else:
            raw = base64.b64decode(data, validate=True)
            if len(raw) != 32:
                raise ValueError(f"base64 of {len(raw)} bytes, an Ed25519 key is 32")
            return raw
    except (ValueError, TypeError, binascii.Error) as e:
        raise InvalidInput(f"{path} is not an Ed25519 public key (PEM, OpenSSH or base64): {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
