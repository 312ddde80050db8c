"""Server-side TLS settings."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedtune.errors import InvalidInput


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key; with ``client_ca`` clients must present a certificate it
    signed (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials."""
        try:
            pair = (self.key.read_bytes(), self.cert.read_bytes())
            ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as e:
            raise InvalidInput(f"cannot read TLS file: {e}") from e
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
