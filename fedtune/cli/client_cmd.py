"""`fedtune client`: the data owner's agent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedtune.cli.options import CaCert, ClientCert, ClientKey, Insecure

app = typer.Typer(help="Run a client agent on private data.", no_args_is_help=True)


@app.command("run")
def run(
    coordinator: Annotated[str, typer.Option("--coordinator", "-c", envvar="FEDTUNE_COORDINATOR",
                                             help="HOST:PORT of the coordinator.")],
    data: Annotated[Path, typer.Option("--data", help=(
        "Private data: JSONL, JSON, CSV, parquet or a saved datasets directory, of {prompt, response}, {text}, "
        "alpaca, chat {messages} or ShareGPT records (check it with fedtune data check)."))],
    data_format: Annotated[str | None, typer.Option(
        "--data-format", help="jsonl, json, csv, parquet or datasets (default: told from the file).")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="FEDTUNE_TOKEN",
                                              help="Enrollment token (not needed once joined).")] = None,
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Identity, cache and models.")] = Path(
        "~/.fedtune/client"),
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (GPU N).")] = "auto",
    name: Annotated[str | None, typer.Option("--name", help="Name shown to the operator.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    max_rank: Annotated[int | None, typer.Option(
        "--max-rank", min=1, help="Train a LoRA job at most at this rank (small devices); the job's rank by default.")
    ] = None,
    micro_batch: Annotated[int | None, typer.Option(
        "--micro-batch", min=1, help="Examples per forward pass; must divide the job's batch_size, which "
                                     "gradient accumulation keeps (default: the job's split).")] = None,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="Load the base in nf4 or int8 (QLoRA) where the job allows it "
                           "(client_quantization: allowed).")] = None,
    base_dir: Annotated[Path | None, typer.Option(
        "--base-dir", help="Your own copy of the job's base: a model directory or a Hugging Face hub cache. "
                           "Checked file by file against the coordinator's sha256 instead of downloaded.")] = None,
    eval_fraction: Annotated[float | None, typer.Option(
        "--eval-fraction", min=0.0, max=1.0, help="Hold this fraction of DATA out of training (a fixed split) "
                                                  "to evaluate the global adapter on when the job asks "
                                                  "(evaluation.clients); only metrics leave.")] = None,
    eval_data: Annotated[Path | None, typer.Option(
        "--eval-data", help="Held-out data for federated evaluation, of DATA's schema (instead of "
                            "--eval-fraction).")] = None,
    connect_timeout: Annotated[float, typer.Option(
        "--connect-timeout", min=0.0, help="Seconds to keep trying a coordinator that cannot be reached at first "
                                           "contact before giving up with exit 5 (0: for ever). Once reached, "
                                           "outages are retried for ever.")] = 60.0,
    ca_cert: CaCert = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
    insecure: Insecure = False,
) -> None:
    """Join the job of TOKEN and train on DATA every round until the job ends.

    The data is validated in full before joining and never leaves this process.
    """
    from fedtune.client.channel import ClientTls
    from fedtune.data import read_data

    kind, _, index = device.partition(":")
    if device not in ("auto", "cpu") and (kind != "cuda" or (index and not index.isdigit())):
        raise typer.BadParameter("--device must be auto, cpu, cuda or cuda:N", param_hint="--device")
    if quantize not in (None, "nf4", "int8"):
        raise typer.BadParameter("--quantize must be nf4 or int8", param_hint="--quantize")
    tls = ClientTls(ca_cert, client_cert, client_key, insecure)
    # The data file and TLS settings are checked before the seconds of importing torch and peft.
    examples: Any = read_data(data, data_format)
    held_out: Any = read_data(eval_data.expanduser()) if eval_data else None
    from fedtune.client.agent import ClientAgent, check_same_schema, split_holdout

    if eval_data is not None:
        check_same_schema(examples, held_out, data, eval_data)
    elif eval_fraction is not None:
        examples, held_out = split_holdout(examples, eval_fraction)

    agent = ClientAgent(coordinator, token, data, state_dir.expanduser(), tls, device=device, name=name,
                        progress=progress, examples=examples, max_rank=max_rank,
                        micro_batch=micro_batch, quantize=quantize,
                        base_dir=base_dir.expanduser() if base_dir else None, eval_examples=held_out,
                        connect_timeout=connect_timeout or None)
    stats = agent.run()
    typer.echo(f"job over: trained {len(stats.rounds)} rounds, {stats.bytes_up} bytes up, "
               f"{stats.bytes_down} bytes down", err=True)
