"""Options shared by the CLI's command groups."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

Coordinator = Annotated[
    str | None,
    typer.Option("--coordinator", "-c", envvar="FEDTUNE_COORDINATOR",
                 help="HOST:PORT of the coordinator (default: the one in --state-dir, else 127.0.0.1:50051)."),
]
StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", envvar="FEDTUNE_STATE_DIR",
                 help="The coordinator's state dir, to read its address and admin token."),
]
AdminToken = Annotated[
    str | None,
    typer.Option("--admin-token", envvar="FEDTUNE_ADMIN_TOKEN",
                 help="The coordinator's admin token, or an identity's token from `fedtune admin add`."),
]
AdminKey = Annotated[
    Path | None,
    typer.Option("--admin-key", envvar="FEDTUNE_ADMIN_KEY",
                 help="Ed25519 private key (PEM or OpenSSH) of a key identity (`fedtune admin add --public-key`): "
                      "signs each admin call; used instead of any admin token."),
]


class Format(str, Enum):
    """Output formats."""

    text = "text"
    json = "json"


FormatOpt = Annotated[Format, typer.Option("--format", help="text for people, json for scripts.")]
CaCert = Annotated[
    Path | None,
    typer.Option("--ca-cert", envvar="FEDTUNE_CA_CERT", help="CA that signed the coordinator's certificate."),
]
ClientCert = Annotated[
    Path | None,
    typer.Option("--client-cert", envvar="FEDTUNE_CLIENT_CERT", help="Client certificate for mTLS."),
]
ClientKey = Annotated[
    Path | None,
    typer.Option("--client-key", envvar="FEDTUNE_CLIENT_KEY", help="Client private key for mTLS."),
]
Insecure = Annotated[
    bool,
    typer.Option("--insecure", help="Plaintext gRPC (only against a coordinator started with --insecure)."),
]
