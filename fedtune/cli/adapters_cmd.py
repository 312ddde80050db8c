"""`fedtune adapters`: the registry of published adapters: list, pull, verify, tag, card, merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedtune.adapters import verify_adapter_dir
from fedtune.cli import adapters_build_cmd
from fedtune.cli.adapter_fetch import listed, pull_into
from fedtune.cli.admin_client import AdminClient, admin_command
from fedtune.cli.options import (
    Format,
    FormatOpt,
)
from fedtune.errors import InvalidInput
from fedtune.protos import fedtune_pb2 as pb
from fedtune.registry import parse_ref
from fedtune.registry.lineage import lineage_of

app = typer.Typer(help="Published adapters: list, pull, verify, tag, card, merge.", no_args_is_help=True)


@app.command("list")
@admin_command
def list_adapters(
    job: Annotated[str | None, typer.Option("--job", help="Only this job's adapters.")] = None,
    tag: Annotated[str | None, typer.Option(
        "--tag", help="Only the rounds this tag points at (e.g. production).")] = None,
    *,
    client: AdminClient,
    fmt: FormatOpt = Format.text,
) -> None:
    """Every published adapter with its round, tags, contributors and eval loss, and the key that signed them."""
    key = client.signing_key()
    rows = []
    for a, manifest in listed(client, job or "", tag or ""):
        lin = lineage_of(manifest)
        rows.append({"job": a.job, "round": a.round, "ref": a.ref, "tags": list(a.tags), "path": str(a.path),
                     "contributors": manifest.get("contributors"), "metrics": manifest.get("metrics", {}),
                     "base_model": manifest.get("base_model"), "method": lin.method,
                     "parent_round": lin.parent_round, "spec_sha256": lin.spec_sha256, "signing_public_key": key})
    if fmt == Format.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        loss = r["metrics"].get("eval_loss")
        loss_s = f"eval_loss {loss:.4f}" if isinstance(loss, float) else "no eval"
        tags_s = f"  [{', '.join(r['tags'])}]" if r["tags"] else ""
        typer.echo(f"{r['job']}  round {r['round']:>3}  {r['contributors']} contributors  {loss_s}{tags_s}  "
                   f"{r['path']}")
    if tag and not rows:
        typer.echo(f"no adapter is tagged {tag}", err=True)
    typer.echo(f"signed by the coordinator key {key} (adapters verify --public-key)", err=True)


@app.command("pull")
@admin_command
def pull(
    ref: Annotated[str, typer.Argument(help="JOB (its latest round), JOB@ROUND or JOB@TAG.", metavar="JOB[@REF]")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the adapter into.")],
    rnd: Annotated[int, typer.Option("--round", min=0, help="Round to pull (default: the latest; or JOB@ROUND).")] = 0,
    *,
    client: AdminClient,
) -> None:
    """Download a published adapter, verify its files, and write it to OUT."""
    r = parse_ref(ref)
    if rnd and (r.round is not None or r.tag is not None):
        raise InvalidInput(f"--round {rnd} and {ref}: name the round once (JOB@ROUND, or JOB --round N)")
    got = pull_into(client, r.job, r.round or rnd, out, r.tag or "")
    typer.echo(f"pulled {r.job} round {got} into {out}", err=True)
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


@app.command("tag")
@admin_command
def tag(
    job: Annotated[str, typer.Argument(help="Job id.")],
    rnd: Annotated[int, typer.Argument(help="A published round of the job.", metavar="ROUND")],
    name: Annotated[str, typer.Argument(help="Tag name, e.g. production (lowercase letters, digits, . _ -).",
                                        metavar="TAG")],
    *,
    client: AdminClient,
) -> None:
    """Point TAG of JOB at a published ROUND (creating or moving it; moving it back is a rollback)."""
    reply = client.call("TagAdapter", pb.TagAdapterRequest(job_id=job, round=rnd, tag=name))
    prev = reply.previous_round  # type: ignore[attr-defined]
    was = "new tag" if not prev else ("unchanged" if prev == rnd else f"was round {prev}")
    typer.echo(f"{job}@{name} -> round {rnd} ({was})", err=True)
    typer.echo(f"{job}@{rnd}")


@app.command("untag")
@admin_command
def untag(
    job: Annotated[str, typer.Argument(help="Job id.")],
    name: Annotated[str, typer.Argument(help="The tag to remove.", metavar="TAG")],
    *,
    client: AdminClient,
) -> None:
    """Remove TAG from JOB (the round it pointed at stays published)."""
    reply = client.call("UntagAdapter", pb.UntagAdapterRequest(job_id=job, tag=name))
    typer.echo(f"{job}@{name} removed (was round {reply.previous_round})", err=True)  # type: ignore[attr-defined]


app.command("card")(adapters_build_cmd.card)
app.command("merge")(adapters_build_cmd.merge)
