"""The `fedtune` command: one Typer app, one module per command group.

Errors a user can cause end as one line on stderr and a stable exit code (fedtune.errors.ExitCode).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from fedtune import __version__
from fedtune.cli import (
    adapters_cmd,
    admin_cmd,
    certs_cmd,
    client_cmd,
    coordinator_cmd,
    data_cmd,
    emulator_cmd,
    job_cmd,
    serve_cmd,
    token_cmd,
)
from fedtune.errors import ExitCode, FedtuneError

app = typer.Typer(
    help="fedtune: federated and offsite tuning of LLMs with PEFT adapters.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(coordinator_cmd.app, name="coordinator")
app.add_typer(job_cmd.app, name="job")
app.add_typer(token_cmd.app, name="token")
app.add_typer(admin_cmd.app, name="admin")
app.add_typer(client_cmd.app, name="client")
app.add_typer(adapters_cmd.app, name="adapters")
app.add_typer(certs_cmd.app, name="certs")
app.add_typer(emulator_cmd.app, name="emulator")
app.add_typer(data_cmd.app, name="data")
app.command("serve")(serve_cmd.serve)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedtune {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """fedtune: federated and offsite tuning of LLMs with PEFT adapters."""


@app.command("demo")
def demo(
    out: Annotated[Path | None, typer.Option("--out", help="Keep state, logs and adapters here.")] = None,
    clients: Annotated[int, typer.Option("--clients", min=1, max=32, help="Client agents to start.")] = 3,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=100, help="Rounds to run.")] = 3,
    secure: Annotated[bool, typer.Option("--secure", help="Aggregate with SecAgg+ (the coordinator sees only sums).")] = False,
) -> None:
    """The whole system on this machine: a coordinator and client processes on loopback, tiny model."""
    from fedtune.demo import run_demo

    run_demo(out, clients, rounds, secure)


@app.command("simulate")
def simulate(
    config: Annotated[Path, typer.Option("--config", help="Job spec YAML.")],
    clients: Annotated[int, typer.Option("--clients", min=1, help="Virtual clients.")],
    partition: Annotated[str, typer.Option("--partition", help="iid, dirichlet:ALPHA or by-key:FIELD.")] = "iid",
    data: Annotated[Path | None, typer.Option("--data", help="Data file to partition, any format (default: synthetic).")] = None,
    client_resources: Annotated[str, typer.Option(
        "--client-resources", help="Per pool worker (a Ray actor running one virtual client, or one batch of "
        "them, at a time): cpus=..,gpus=..; the pool holds as many workers as the cluster fits.")]
    = "cpus=0.25",
    batch_clients: Annotated[int, typer.Option(
        "--batch-clients", help="Cohort members a worker runs at once, their adapters trained in one pass of "
        "the base.")] = 1,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="Pool size (default: what the cluster's resources fit at --client-resources).")]
    = None,
    out: Annotated[Path | None, typer.Option("--out", help="Keep state, data and adapters here.")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Join this Ray cluster.")] = None,
    coordinator_host: Annotated[str | None, typer.Option(
        "--coordinator-host", help="Where the simulation's coordinator listens, reachable from every Ray worker "
        "(default: 127.0.0.1 on a local Ray; with --ray-address, this node's IP as Ray reports it).")] = None,
) -> None:
    """Many virtual clients on Ray, through the same code path as real agents."""
    from fedtune.errors import InvalidInput

    # Imports neither torch nor Ray: the runner checks the settings and data before they load.
    from fedtune.simulation.runner import ClientResources
    from fedtune.simulation.runner import simulate as run_simulation

    if not config.is_file():
        raise InvalidInput(f"job spec {config} does not exist")
    run_simulation(config, clients, partition, data, ClientResources.parse(client_resources), out, ray_address,
                   batch_clients, workers, coordinator_host)


def _setup_logging() -> None:
    level = os.environ.get("FEDTUNE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "urllib3", "filelock", "httpx", "huggingface_hub", "bitsandbytes", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes 0.50 warns on every import that an optional kernels package is missing; its
    # CPU path works without it, so the line only alarms users.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # peft 0.21 calls a transformers 5 API that is only renamed; users cannot act on it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


# Typer >= 0.22 vendors click; older ones raise click's own exceptions. Both have show()/exit_code.
try:
    import click as _click

    _USAGE_ERRORS: tuple[type[Exception], ...] = (_click.ClickException,)
    _ABORTS: tuple[type[BaseException], ...] = (_click.exceptions.Abort,)
except ImportError:  # pragma: no cover - click is not installed with a vendoring typer
    _USAGE_ERRORS, _ABORTS = (), ()
_USAGE_ERRORS += tuple(c for c in (getattr(typer, "TyperException", None),) if c is not None)
_ABORTS += (typer.Abort, KeyboardInterrupt)


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    _setup_logging()
    signal.signal(signal.SIGTERM, _sigterm)
    # Ctrl-C stops the command cleanly (an agent sends its Leave) even when the shell started it
    # with SIGINT ignored, as non-interactive shells do for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rv = app(args=argv, standalone_mode=False)
    except FedtuneError as e:
        print(f"fedtune: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except _ABORTS:
        print("fedtune: interrupted", file=sys.stderr)
        sys.exit(ExitCode.INTERRUPTED)
    except _USAGE_ERRORS as e:
        e.show()  # type: ignore[attr-defined]
        sys.exit(e.exit_code)  # type: ignore[attr-defined]
    if rv == ExitCode.INTERRUPTED:  # typer turns KeyboardInterrupt (and our SIGTERM) into Exit(130)
        print("fedtune: interrupted", file=sys.stderr)
    sys.exit(rv if isinstance(rv, int) else ExitCode.OK)
