"""`fedtune token`: enrollment tokens for client agents."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fedtune.cli.admin_client import AdminClient, admin_command
from fedtune.cli.options import (
    Format,
    FormatOpt,
)
from fedtune.protos import fedtune_pb2 as pb

app = typer.Typer(help="Enrollment tokens for client agents.", no_args_is_help=True)


@app.command("create")
@admin_command
def create(
    job: Annotated[str, typer.Option("--job", help="Job the token enrolls into.")],
    uses: Annotated[int, typer.Option("--uses", min=1, help="How many clients may join with it.")] = 1,
    ttl: Annotated[int, typer.Option("--ttl", min=1, help="Seconds until it expires.")] = 24 * 3600,
    *,
    client: AdminClient,
    fmt: FormatOpt = Format.text,
) -> None:
    """Create a token scoped to JOB; prints the token alone (only its hash is stored)."""
    reply = client.call("CreateToken", pb.CreateTokenRequest(job_id=job, uses=uses, ttl_seconds=ttl))
    if fmt == Format.json:
        typer.echo(json.dumps({"token": reply.token, "token_id": reply.token_id,  # type: ignore[attr-defined]
                               "expires": reply.expires_unix}))  # type: ignore[attr-defined]
    else:
        typer.echo(reply.token)  # type: ignore[attr-defined]


@app.command("revoke")
@admin_command
def revoke(
    token: Annotated[str, typer.Argument(help="The token, or its id from `token create --format json`.")],
    *,
    client: AdminClient,
) -> None:
    """Revoke a token: it can no longer enroll, and clients enrolled with it can no longer submit."""
    reply = client.call("RevokeToken", pb.RevokeTokenRequest(token=token))
    typer.echo(f"revoked {reply.token_id}; {reply.clients} enrolled clients refused from now on")  # type: ignore[attr-defined]
