"""The coordinator's private keys, under STATE_DIR/keys (PEM, mode 0600).

One X25519 key per job (clients encrypt their updates to it) and one Ed25519 key that signs
published manifests. Losing the state dir loses them, as it loses everything else.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.crypto.envelope import UpdateBinding, open_envelope
from fedtune.crypto.keys import load_or_create, raw_public_bytes
from fedtune.errors import InvalidInput

# The manifest-signing key, under STATE_DIR/keys.
SIGNING_KEY_FILE = "coordinator.ed25519.pem"


def signing_public_key(state_dir: Path, fix: str = "") -> str:
    """The coordinator's signing key (base64 raw Ed25519), read from its state dir; nothing is created.

    Args:
        state_dir: the coordinator's state dir.
        fix: appended to each error message (how the caller can do without the state dir).

    Raises:
        InvalidInput: no key there, or not a readable Ed25519 key.
    """
    path = state_dir / "keys" / SIGNING_KEY_FILE
    if not path.is_file():
        raise InvalidInput(f"no signing key in {state_dir}: not a coordinator's state dir, or no coordinator "
                           f"has been started there yet{fix}")
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot read the signing key {path}: {e}{fix}") from e
    if not isinstance(private, Ed25519PrivateKey):
        raise InvalidInput(f"{path} holds a {type(private).__name__}, not an Ed25519 key")
    return base64.b64encode(raw_public_bytes(private)).decode()


class KeyRing:
    """Loads (or creates) and caches the coordinator's keys."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        self._jobs: dict[str, X25519PrivateKey] = {}
        self._lock = threading.Lock()
        self.signing_key = load_or_create(root / SIGNING_KEY_FILE, Ed25519PrivateKey)  # type: ignore[type-abstract]

    def job_key(self, job_id: str) -> X25519PrivateKey:
        """The job's update-encryption key."""
        with self._lock:
            if job_id not in self._jobs:
                self._jobs[job_id] = load_or_create(
                    self.root / f"{job_id}.x25519.pem", X25519PrivateKey)  # type: ignore[type-abstract]
            return self._jobs[job_id]

    def job_public_key(self, job_id: str) -> bytes:
        """Raw public half of the job's key (sent to clients with every task)."""
        return raw_public_bytes(self.job_key(job_id))

    def signing_public_key(self) -> bytes:
        """Raw Ed25519 public key that verifies published manifests."""
        return raw_public_bytes(self.signing_key)

    def open_update(self, envelope: bytes, binding: UpdateBinding) -> bytes:
        """Decrypts one update envelope (raises InvalidInput when it does not authenticate)."""
        return open_envelope(envelope, self.job_key(binding.job_id), binding)
