"""The coordinator's private keys, under STATE_DIR/keys (PEM, mode 0600).

One X25519 key per job (clients encrypt their updates to it) and one Ed25519 key that signs
published manifests. Losing the state dir loses them, as it loses everything else.
"""

from __future__ import annotations

import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedtune.crypto.envelope import UpdateBinding, open_envelope
from fedtune.crypto.keys import load_or_create, raw_public_bytes


class KeyRing:
    """Loads (or creates) and caches the coordinator's keys."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        self._jobs: dict[str, X25519PrivateKey] = {}
        self._lock = threading.Lock()
        self.signing_key = load_or_create(root / "coordinator.ed25519.pem", Ed25519PrivateKey)  # type: ignore[type-abstract]

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
