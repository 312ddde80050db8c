"""`fedtune adapters card` and `fedtune adapters merge`: what a published round becomes outside fedtune.

Both resolve ``JOB@REF`` through the coordinator's admin API and work on a pulled, verified copy:
the card goes into that directory (``--dir``, pulled first when it is not there yet), the merged
model into a new directory (``--out``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from fedtune.adapters import verify_adapter_dir
from fedtune.cli.adapter_fetch import pull_into, resolve
from fedtune.cli.admin_client import AdminClient, admin_command
from fedtune.errors import InvalidInput
from fedtune.protos import fedtune_pb2 as pb
from fedtune.registry.card import render_card, write_card
from fedtune.registry.interop import vllm_problems

RefArg = Annotated[str, typer.Argument(help="JOB (its latest round), JOB@ROUND or JOB@TAG.", metavar="JOB@REF")]


@admin_command
def card(
    ref: RefArg,
    adapter_dir: Annotated[Path | None, typer.Option(
        "--dir", help="The adapter's directory (from `adapters pull`); pulled into it when missing "
        "(default: ./JOB-round-N).")] = None,
    *,
    client: AdminClient,
) -> None:
    """Write a model card (README.md, Hugging Face layout) into a pulled adapter directory.

    README.md is not one of the files fedtune.json signs: the adapter still verifies.
    """
    found, manifest, history = resolve(client, ref)
    target = adapter_dir or Path(f"{found.job}-round-{found.round}")
    key = client.signing_key()
    if not (target / "fedtune.json").exists():
        pull_into(client, found.job, found.round, target)
        typer.echo(f"pulled {found.ref} into {target}", err=True)
    local = verify_adapter_dir(target, key)
    if (local.get("job"), local.get("round")) != (found.job, found.round):
        raise InvalidInput(f"{target} holds {local.get('job')}@{local.get('round')}, not {ref} ({found.ref}): "
                           "pass --dir of that adapter, or a new directory to pull it into")
    owners = len(client.call("GetJob", pb.GetJobRequest(job_id=found.job)).clients)  # type: ignore[attr-defined]
    text = render_card(manifest, history, data_owners=owners, signing_key=key, vllm_ready=not vllm_problems(target))
    path = write_card(target, text)
    typer.echo(f"model card for {found.ref} written", err=True)
    typer.echo(str(path))


@admin_command
def merge(
    ref: RefArg,
    out: Annotated[Path, typer.Option("--out", help="New directory for the merged model.")],
    base: Annotated[str | None, typer.Option(
        "--base", help="The base model on this machine: a directory, preset name or hub id "
        "(default: the one the adapter's manifest names); its files must hash as the manifest says.")] = None,
    *,
    client: AdminClient,
) -> None:
    """Merge a published adapter into its base (peft's merge_and_unload): a full model transformers loads."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"--out {out} exists and is not empty: choose a new directory")
    found, manifest, _ = resolve(client, ref)
    # Imported here: torch and transformers take seconds, which the other adapters commands never pay.
    from fedtune.models import is_preset, resolve_base
    from fedtune.registry.merge import check_mergeable, merge_adapter

    with tempfile.TemporaryDirectory(prefix="fedtune-merge-") as tmp:
        adapter = Path(tmp) / "adapter"
        pull_into(client, found.job, found.round, adapter)
        check_mergeable(adapter)
        name = base or str(manifest.get("base_model", ""))
        if not is_preset(name) and not Path(name).expanduser().is_dir() and is_preset(Path(name).name):
            name = Path(name).name  # a preset the coordinator materialized in its own state dir
        base_dir = resolve_base(name, Path(tmp) / "models")
        try:
            merge_adapter(adapter, base_dir, out, manifest)
        except BaseException:
            shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
            raise
    typer.echo(f"merged {found.ref} into {name}: {out}", err=True)
    typer.echo(str(out))
