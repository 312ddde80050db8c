"""gRPC channels to the coordinator: TLS (optionally mTLS) unless plaintext is asked for explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from fedtune.errors import InvalidInput

# Keep in step with fedtune.coordinator.server.MAX_MESSAGE_BYTES: chunks are 1 MiB.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Reconnect quickly when a restarted coordinator comes back (the default backoff reaches 2 min).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

# Errors that mean "the coordinator is away or busy; try again later".
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.CANCELLED)
# A failed TLS handshake also surfaces as UNAVAILABLE, but waiting will not fix a certificate.
_TLS_FAILURES = ("handshake failed", "certificate verify failed", "certificate_verify_failed", "ssl_error",
                 "tls handshake")


@dataclass(frozen=True)
class ClientTls:
    """How a client or admin command connects: TLS with an optional CA and client certificate, or
    plaintext when ``insecure`` is set."""

    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials; system roots when no CA is given."""
        if (self.cert is None) != (self.key is None):
            raise InvalidInput("--client-cert and --client-key go together")
        try:
            return grpc.ssl_channel_credentials(
                root_certificates=self.ca_cert.read_bytes() if self.ca_cert else None,
                private_key=self.key.read_bytes() if self.key else None,
                certificate_chain=self.cert.read_bytes() if self.cert else None,
            )
        except OSError as e:
            raise InvalidInput(f"cannot read TLS file: {e}") from e


INSECURE = ClientTls(insecure=True)


def open_channel(address: str, tls: ClientTls) -> grpc.Channel:
    """A channel to ``HOST:PORT``: TLS unless ``tls.insecure``."""
    if tls.insecure:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, tls.credentials(), options=CHANNEL_OPTIONS)


def is_tls_failure(err: grpc.RpcError) -> bool:
    """Whether a failed call is a TLS handshake or certificate failure."""
    details = (err.details() or "").lower() if hasattr(err, "details") else ""
    return any(marker in details for marker in _TLS_FAILURES)


def is_transient(err: grpc.RpcError) -> bool:
    """Whether a failed call is worth retrying."""
    return hasattr(err, "code") and err.code() in TRANSIENT and not is_tls_failure(err)
