"""`fedtune coordinator`: run the service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Run the coordinator service.", no_args_is_help=True)


@app.command("start")
def start(
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Where jobs, updates and adapters are kept.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0 picks a free one).")] = 50051,
) -> None:
    """Serve the client API, the admin API and gRPC health until SIGTERM or Ctrl-C.

    A restart on the same state dir resumes every job in the round it was in.
    """
    from fedtune.coordinator.server import serve_forever

    serve_forever(state_dir.resolve(), host, port)
