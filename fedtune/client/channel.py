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
                 "tls handshake", "hostname verification")


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

    def diagnose(self, error: grpc.RpcError, address: str) -> ConnectionProblem | None:
        """:func:`diagnose_connection` of a call made with these settings."""
        return diagnose_connection(error, address, not self.insecure, ca_cert=self.ca_cert,
                                   client_cert=self.cert is not None)


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


@dataclass(frozen=True)
class ConnectionProblem:
    """Why a call never reached the coordinator's service.

    Attributes:
        message: One line naming the address, what went wrong and the flag that fixes it.
        credentials: True when the transport settings are wrong (TLS vs plaintext, CA, client
            certificate): retrying will not help, and the CLI exits with the authentication code.
            False when nothing answered (refused, timed out, unresolvable).
    """

    message: str
    credentials: bool


def diagnose_connection(error: grpc.RpcError, address: str, tls_configured: bool, *,
                        ca_cert: Path | None = None, client_cert: bool = False) -> ConnectionProblem | None:
    """Classifies a failed call as a connection problem, or returns None when the coordinator answered.

    gRPC reports every transport failure as UNAVAILABLE (or DEADLINE_EXCEEDED) with a C-core
    string; this reads that string once, here, so that the CLI and the client agent say the same thing.

    Args:
        error: The failed call.
        address: HOST:PORT the channel was opened to.
        tls_configured: Whether the channel spoke TLS (False: ``--insecure``).
        ca_cert: The ``--ca-cert`` file, when one was given (named in the message).
        client_cert: Whether a client certificate was presented (mTLS).

    Returns:
        The problem, or None when the error is an answer from the service (bad token, unknown job...).
    """
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() or "") if hasattr(error, "details") else str(error)
    low = details.lower()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ConnectionProblem(f"the coordinator at {address} did not answer in time (timed out): check "
                                 "--coordinator HOST:PORT, and that no firewall drops the traffic", False)
    if code != grpc.StatusCode.UNAVAILABLE:
        return None
    ca = f"--ca-cert {ca_cert}" if ca_cert is not None else "this machine's trusted CAs (no --ca-cert given)"
    tls_failed = f"TLS handshake with {address} failed"
    if tls_configured and any(m in low for m in ("wrong_version_number", "packet_length_too_long", "http_request")):
        return ConnectionProblem(f"the coordinator at {address} speaks plaintext, not TLS: pass --insecure "
                                 "(it was started with --insecure)", True)
    if "hostname verification" in low:
        host = address.rsplit(":", 1)[0]
        return ConnectionProblem(f"{tls_failed}: its certificate is not issued for {host}: connect to a name "
                                 "its certificate lists (`fedtune certs init --host NAME`)", True)
    if "expired" in low:
        return ConnectionProblem(f"{tls_failed}: its certificate has expired", True)
    if any(m in low for m in ("certificate signature failure", "bad_signature", "certificate_verify_failed",
                              "unable to get local issuer", "self signed", "self-signed")):
        hint = "" if ca_cert is not None else ": pass --ca-cert FILE, the CA that signed it"
        return ConnectionProblem(f"{tls_failed}: its certificate is not signed by {ca}{hint}", True)
    if "socket closed" in low or "connection reset" in low:
        # The server hung up during or right after the handshake. Plaintext against a TLS port and
        # TLS without an acceptable client certificate against an mTLS port both look like this.
        if not tls_configured:
            return ConnectionProblem(f"the coordinator at {address} closed a plaintext connection: it speaks "
                                     "TLS: pass --ca-cert FILE (the CA that signed its certificate) instead of "
                                     "--insecure", True)
        if not client_cert:
            return ConnectionProblem(f"the coordinator at {address} requires a client certificate (mTLS): pass "
                                     "--client-cert FILE --client-key FILE", True)
        return ConnectionProblem(f"the coordinator at {address} refused the client certificate: pass a "
                                 "--client-cert/--client-key signed by the CA it trusts (its --client-ca)", True)
    if "handshake" in low or "tsi_" in low or "ssl_error" in low:
        reason = details.rsplit(":", 2)[-2].strip() if details.count(":") >= 2 else details
        return ConnectionProblem(f"{tls_failed}: {reason}", True)
    if "connection refused" in low:
        return ConnectionProblem(f"nothing is listening at {address} (connection refused): is the coordinator "
                                 "running, and is --coordinator HOST:PORT right?", False)
    if "timed out" in low or "timeout" in low:
        return ConnectionProblem(f"the coordinator at {address} did not answer in time (timed out): check "
                                 "--coordinator HOST:PORT, and that no firewall drops the traffic", False)
    if "resolv" in low or "name not found" in low or "dns" in low:
        return ConnectionProblem(f"cannot resolve the host of {address}: check --coordinator HOST:PORT", False)
    if "unreachable" in low or "no route" in low:
        return ConnectionProblem(f"{address} cannot be reached from here (no route): check --coordinator "
                                 "HOST:PORT and the network", False)
    if "failed to connect" in low:
        last = details.split("last error:", 1)[-1].strip()
        return ConnectionProblem(f"cannot connect to the coordinator at {address}: {last}", False)
    return None
