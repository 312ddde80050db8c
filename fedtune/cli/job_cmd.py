"""`fedtune job`: write, create, list, inspect and cancel jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedtune.cli.admin_client import AdminClient, admin_command
from fedtune.cli.options import (
    Format,
    FormatOpt,
)
from fedtune.errors import InvalidInput, PreconditionFailed
from fedtune.protos import fedtune_pb2 as pb
from fedtune.report import client_eval_lines, history_lines, status_dict
from fedtune.spec import example_spec, method_list, parse_spec, spec_to_yaml

app = typer.Typer(help="Create and follow tuning jobs.", no_args_is_help=True)


@app.command("init")
def init(
    base: Annotated[str, typer.Option("--base", help="Base model: preset, local dir or hub id.")] = "tiny-llama",
    method: Annotated[str, typer.Option("--method", help="PEFT method of the example (see --list-methods).")] = "lora",
    list_methods: Annotated[bool, typer.Option("--list-methods", help="List the PEFT methods, one per line.")] = False,
    list_strategies: Annotated[bool, typer.Option(
        "--list-strategies", help="List the aggregation strategies (aggregation.strategy), one per line.")] = False,
) -> None:
    """Print a commented example job spec to stdout."""
    if list_methods:
        typer.echo(method_list(), nl=False)
        return
    if list_strategies:
        from fedtune.strategies import strategy_list

        typer.echo(strategy_list(), nl=False)
        return
    typer.echo(example_spec(base, method), nl=False)


@app.command("create")
@admin_command
def create(
    spec_file: Annotated[Path, typer.Argument(help="Job spec YAML.")],
    *,
    client: AdminClient,
) -> None:
    """Validate SPEC and create the job; prints the job id alone."""
    if not spec_file.is_file():
        raise InvalidInput(f"job spec {spec_file} does not exist")
    # Validate here first (the coordinator validates again): errors reach the user without a round trip,
    # and relative paths are made absolute against the spec's directory.
    spec = parse_spec(spec_file.read_text(), base_dir=spec_file.resolve().parent)
    status = client.call("CreateJob", pb.CreateJobRequest(spec_yaml=spec_to_yaml(spec)))
    typer.echo(status.job_id)  # type: ignore[attr-defined]


def _print_status(status: pb.JobStatus, signing_key: str) -> None:
    typer.echo(f"job {status.job_id} ({status.name}): {status.state}, round {status.current_round}/{status.rounds}")
    typer.echo(f"base model: {status.base_model}")
    typer.echo(f"signing key: {signing_key} (adapters verify --public-key)")
    sched = status.scheduling
    if sched.backend:
        quota = f"{sched.cpus:g} CPU" + (f", {sched.gpus:g} GPU" if sched.gpus else "") + (
            f", {sched.memory_gb:g} GB" if sched.memory_gb else "")
        line = f"scheduling: {sched.backend}, priority {sched.priority}, quota {quota}"
        if sched.queue_position:
            line += f"; queued, place {sched.queue_position}: {sched.reason}"
        if sched.engine_restarts:
            line += f"; engine restarted {sched.engine_restarts}x from its checkpoint"
        typer.echo(line)
    if status.message:
        typer.echo(f"message: {status.message}")
    live = sum(c.connected for c in status.clients)
    typer.echo(f"clients: {len(status.clients)} enrolled, {live} connected")
    base = json.loads(status.base_metrics_json or "{}")
    if "eval_loss" in base:
        typer.echo(f"base eval loss: {base['eval_loss']:.4f}")
    if status.history:
        for line in history_lines(status):
            typer.echo(line)
    for line in client_eval_lines(status):
        typer.echo(line)


@app.command("status")
@admin_command
def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    *,
    client: AdminClient,
    fmt: FormatOpt = Format.text,
    watch: Annotated[bool, typer.Option(
        "--watch", help="A live view (round, phase, cohort, each client's progress and losses) redrawn until the "
        "job ends; exits 0 when it finishes, 6 when it fails or is cancelled.")] = False,
    interval: Annotated[float, typer.Option(
        "--interval", min=0.1, help="Seconds between two looks at the job, with --watch.")] = 2.0,
) -> None:
    """State, current round, clients and metrics of a job."""
    if watch:
        _watch(client, job_id, fmt, interval)
        return
    st = client.call("GetJob", pb.GetJobRequest(job_id=job_id))
    key = client.signing_key()
    if fmt == Format.json:
        typer.echo(json.dumps(status_dict(st) | {"signing_public_key": key}, indent=2))
    else:
        _print_status(st, key)  # type: ignore[arg-type]


def _watch(client: AdminClient, job_id: str, fmt: Format, interval: float) -> None:
    from fedtune.reporting.live import watch

    if fmt == Format.json:
        raise InvalidInput("--watch draws a view for people; for scripts, poll `job status --format json`")
    st = watch(lambda: client.call("GetJob", pb.GetJobRequest(job_id=job_id), timeout=max(10.0, 2 * interval)),
               interval)
    if st.state != "finished":
        raise PreconditionFailed(f"job {job_id} {st.state}" + (f": {st.message}" if st.message else ""))


@app.command("report")
@admin_command
def report(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    *,
    client: AdminClient,
    out: Annotated[Path, typer.Option("--out", help="Directory to write index.html and its plots into.")],
) -> None:
    """Write an HTML report of a job with plots (eval loss, each client's train loss, bytes, participation,
    DP epsilon) for a browser; prints the path of its index.html alone."""
    st = client.call("GetJob", pb.GetJobRequest(job_id=job_id))
    from fedtune.reporting.html import write_report

    typer.echo(write_report(st, out))  # type: ignore[arg-type]


@app.command("list")
@admin_command
def list_jobs(
    *,
    client: AdminClient,
    fmt: FormatOpt = Format.text,
) -> None:
    """All jobs of a coordinator."""
    reply = client.call("ListJobs", pb.ListJobsRequest())
    jobs = reply.jobs  # type: ignore[attr-defined]
    if fmt == Format.json:
        typer.echo(json.dumps([status_dict(j) for j in jobs], indent=2))
        return
    for j in jobs:
        place = f" (place {j.scheduling.queue_position})" if j.scheduling.queue_position else ""
        typer.echo(f"{j.job_id}  {j.state:<9}  round {j.current_round}/{j.rounds}  {j.name}{place}")


@app.command("cancel")
@admin_command
def cancel(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    *,
    client: AdminClient,
) -> None:
    """Cancel a job (its published adapters stay)."""
    st = client.call("CancelJob", pb.GetJobRequest(job_id=job_id))
    typer.echo(f"{st.job_id} {st.state}")  # type: ignore[attr-defined]
