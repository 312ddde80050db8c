"""gRPC channels to the coordinator, with the same size and keepalive settings as the server."""

from __future__ import annotations

import grpc

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


def open_channel(address: str) -> grpc.Channel:
    """A channel to ``HOST:PORT``."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def is_transient(err: grpc.RpcError) -> bool:
    """Whether a failed call is worth retrying."""
    return hasattr(err, "code") and err.code() in TRANSIENT
