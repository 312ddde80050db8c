"""`fedtune token`: enrollment tokens for client agents."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fedtune.cli.admin_client import AdminClient
from fedtune.cli.options import (
    AdminToken,
    CaCert,
    ClientCert,
    ClientKey,
    Coordinator,
    Format,
    FormatOpt,
    Insecure,
    StateDir,
)
from fedtune.protos import fedtune_pb2 as pb

app = typer.Typer(help="Enrollment tokens for client agents.", no_args_is_help=True)


@app.command("create")
def create(
    job: Annotated[str, typer.Option("--job", help="Job the token enrolls into.")],
    uses: Annotated[int, typer.Option("--uses", min=1, help="How many clients may join with it.")] = 1,
    ttl: Annotated[int, typer.Option("--ttl", min=1, help="Seconds until it expires.")] = 24 * 3600,
    coordinator: Coordinator = None,
    state_dir: StateDir = None,
    admin_token: AdminToken = None,
    ca_cert: CaCert = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
    fmt: FormatOpt = Format.text,
) -> None:
    """Create a token scoped to JOB; prints the token alone (only its hash is stored)."""
    client = AdminClient.from_options(coordinator, state_dir, admin_token, ca_cert, client_cert, client_key,
                                      insecure)
    reply = client.call("CreateToken", pb.CreateTokenRequest(job_id=job, uses=uses, ttl_seconds=ttl))
    if fmt == Format.json:
        typer.echo(json.dumps({"token": reply.token, "token_id": reply.token_id,  # type: ignore[attr-defined]
                               "expires": reply.expires_unix}))  # type: ignore[attr-defined]
    else:
        typer.echo(reply.token)  # type: ignore[attr-defined]


@app.command("revoke")
def revoke(
    token: Annotated[str, typer.Argument(help="The token, or its id from `token create --format json`.")],
    coordinator: Coordinator = None,
    state_dir: StateDir = None,
    admin_token: AdminToken = None,
    ca_cert: CaCert = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Revoke a token: it can no longer enroll, and clients enrolled with it can no longer submit."""
    client = AdminClient.from_options(coordinator, state_dir, admin_token, ca_cert, client_cert, client_key,
                                      insecure)
    reply = client.call("RevokeToken", pb.RevokeTokenRequest(token=token))
    typer.echo(f"revoked {reply.token_id}; {reply.clients} enrolled clients refused from now on")  # type: ignore[attr-defined]
