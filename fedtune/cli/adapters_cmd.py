"""`fedtune adapters`: list, pull and verify published adapters."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Annotated

import grpc
import typer

from fedtune.adapters import verify_adapter_dir
from fedtune.cli.admin_client import AdminClient, admin_command
from fedtune.cli.options import (
    Format,
    FormatOpt,
)
from fedtune.errors import InvalidInput
from fedtune.protos import fedtune_pb2 as pb

app = typer.Typer(help="Published adapters: list, pull, verify.", no_args_is_help=True)


@app.command("list")
@admin_command
def list_adapters(
    job: Annotated[str | None, typer.Option("--job", help="Only this job's adapters.")] = None,
    *,
    client: AdminClient,
    fmt: FormatOpt = Format.text,
) -> None:
    """Every published adapter with its round, contributors and eval loss, and the key that signed them."""
    reply = client.call("ListAdapters", pb.ListAdaptersRequest(job_id=job or ""))
    key = client.signing_key()
    rows = []
    for a in reply.adapters:  # type: ignore[attr-defined]
        manifest = json.loads(a.manifest_json)
        rows.append({"job": a.job_id, "round": a.round, "path": a.path, "contributors": manifest.get("contributors"),
                     "metrics": manifest.get("metrics", {}), "base_model": manifest.get("base_model"),
                     "signing_public_key": key})
    if fmt == Format.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        loss = r["metrics"].get("eval_loss")
        loss_s = f"eval_loss {loss:.4f}" if isinstance(loss, float) else "no eval"
        typer.echo(f"{r['job']}  round {r['round']:>3}  {r['contributors']} contributors  {loss_s}  {r['path']}")
    typer.echo(f"signed by the coordinator key {key} (adapters verify --public-key)", err=True)


@app.command("pull")
@admin_command
def pull(
    job: Annotated[str, typer.Argument(help="Job id.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the adapter into.")],
    rnd: Annotated[int, typer.Option("--round", min=0, help="Round to pull (default: the latest).")] = 0,
    *,
    client: AdminClient,
) -> None:
    """Download a published adapter, verify its files, and write it to OUT."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hashes: dict[str, hashlib._Hash] = {}
    got_round = 0
    try:
        for msg in client.stream("PullAdapter", pb.PullAdapterRequest(job_id=job, round=rnd)):  # type: ignore[attr-defined]
            name = os.path.basename(msg.path)
            if name != msg.path or name.startswith("."):
                raise InvalidInput(f"coordinator sent a file with an unsafe name {msg.path!r}")
            with (tmp / name).open("ab") as f:
                f.write(msg.chunk.data)
            hashes.setdefault(name, hashlib.sha256()).update(msg.chunk.data)
            got_round = msg.round
    except grpc.RpcError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise client.error(e) from e
    trusted = client.signing_key()
    try:
        verify_adapter_dir(tmp, trusted)
    except InvalidInput:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    typer.echo(f"pulled {job} round {got_round} into {out}", err=True)
    typer.echo(str(out))


@app.command("verify")
def verify(
    adapter_dir: Annotated[Path, typer.Argument(help="Adapter directory.")],
    public_key: Annotated[str | None, typer.Option(
        "--public-key", help="The coordinator's signing key (base64, or a file holding it); "
        "without it the signature is checked against the key in the manifest.")] = None,
) -> None:
    """Check the signature of fedtune.json and every file against its sha256; exit non-zero naming what failed."""
    trusted = None
    if public_key is not None:
        trusted = Path(public_key).read_text().strip() if Path(public_key).is_file() else public_key
    manifest = verify_adapter_dir(adapter_dir, trusted)
    pinned = "pinned key" if trusted else "key in the manifest (pass --public-key to pin the coordinator's)"
    typer.echo(f"ok: {adapter_dir} (job {manifest.get('job')}, round {manifest.get('round')}, "
               f"{len(manifest['files'])} files, signature by the {pinned})")
