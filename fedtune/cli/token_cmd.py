"""`fedtune token`: enrollment tokens for client agents."""

from __future__ import annotations

from typing import Annotated

import typer

from fedtune.cli.admin_client import AdminClient
from fedtune.cli.options import AdminToken, Coordinator, StateDir
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
) -> None:
    """Create a token scoped to JOB; prints the token alone (only its hash is stored)."""
    client = AdminClient.from_options(coordinator, state_dir, admin_token)
    reply = client.call("CreateToken", pb.CreateTokenRequest(job_id=job, uses=uses, ttl_seconds=ttl))
    typer.echo(reply.token)  # type: ignore[attr-defined]
