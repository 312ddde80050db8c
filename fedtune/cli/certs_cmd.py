"""`fedtune certs`: trial certificates for TLS and mTLS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Trial certificates for TLS and mTLS.", no_args_is_help=True)


@app.command("init")
def init(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the CA, server and client files into.")],
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="Name or IP the coordinator is reached at (repeat; localhost and 127.0.0.1 are always "
        "added, for admin commands on the coordinator's own machine).")] = None,
    client: Annotated[list[str] | None, typer.Option(
        "--client", help="A client certificate to make (repeat; default one named 'client').")] = None,
) -> None:
    """Make a CA, a server certificate and client certificates (ECDSA P-256, one year)."""
    from fedtune.crypto.certs import init_certs

    # The first name is the certificate's subject; loopback names let the operator's admin commands
    # reach a coordinator bound to 0.0.0.0 through its state dir.
    hosts = list(dict.fromkeys([*(host or []), "localhost", "127.0.0.1"]))
    paths = init_certs(out, hosts, client or ["client"])
    typer.echo(f"CA {paths.ca_cert}; server {paths.server_cert} + {paths.server_key}; "
               f"client {paths.client_cert} + {paths.client_key}", err=True)
    typer.echo(
        f"coordinator: --tls-cert {paths.server_cert} --tls-key {paths.server_key} [--client-ca {paths.ca_cert}]\n"
        f"clients:     --ca-cert {paths.ca_cert} [--client-cert {paths.client_cert} --client-key {paths.client_key}]"
    )
