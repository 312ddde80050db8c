"""`fedtune admin`: operator identities (viewer, operator, admin) and the audit log of admin calls."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fedtune.cli.admin_client import AdminClient, admin_command
from fedtune.cli.options import Format, FormatOpt
from fedtune.crypto.keys import read_ed25519_public
from fedtune.protos import fedtune_pb2 as pb

app = typer.Typer(help="Operator identities with roles, and the audit log of admin calls.", no_args_is_help=True)


class RoleName(str, Enum):
    """The roles, lowest first: each may do what the ones before it may."""

    viewer = "viewer"
    operator = "operator"
    admin = "admin"


def _identity(i: pb.AdminIdentity) -> dict[str, object]:
    return {"name": i.name, "role": i.role, "kind": i.kind, "created": i.created_unix, "created_by": i.created_by,
            "key_fingerprint": i.key_fingerprint}


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix)) if unix else "-"


@app.command("add")
@admin_command
def add(
    name: Annotated[str, typer.Argument(help="Who this identity is (letters, digits, . _ @ -).")],
    role: Annotated[RoleName, typer.Option(
        "--role", help="viewer: status, reports and reads; operator: also jobs and tokens; admin: everything.")],
    public_key: Annotated[Path | None, typer.Option(
        "--public-key", help="Ed25519 public key file (PEM, OpenSSH or base64): a key identity that signs its "
        "calls with --admin-key; without it, a token identity.")] = None,
    *,
    client: AdminClient,
    fmt: FormatOpt = Format.text,
) -> None:
    """Add an identity; a token identity's token is printed alone, this once (only its hash is kept)."""
    raw = read_ed25519_public(public_key) if public_key is not None else b""
    reply = client.call("AddAdmin", pb.AddAdminRequest(name=name, role=role.value, public_key=raw))
    ident = reply.identity  # type: ignore[attr-defined]
    if fmt == Format.json:
        typer.echo(json.dumps({**_identity(ident), "token": reply.token or None}))  # type: ignore[attr-defined]
    elif reply.token:  # type: ignore[attr-defined]
        typer.echo(f"token of {ident.name} (role {ident.role}), shown this once:", err=True)
        typer.echo(reply.token)  # type: ignore[attr-defined]
    else:
        typer.echo(f"added {ident.name}: role {ident.role}, key {ident.key_fingerprint}")


@app.command("list")
@admin_command
def list_(*, client: AdminClient, fmt: FormatOpt = Format.text) -> None:
    """List the identities (the state dir's admin.token first, always an admin)."""
    reply = client.call("ListAdmins", pb.ListAdminsRequest())
    rows = [_identity(i) for i in reply.identities]  # type: ignore[attr-defined]
    if fmt == Format.json:
        typer.echo(json.dumps(rows))
        return
    typer.echo(f"{'NAME':<24} {'ROLE':<9} {'KIND':<12} {'CREATED (UTC)':<19}  {'BY':<16} KEY")
    for r in rows:
        typer.echo(f"{r['name']:<24} {r['role']:<9} {r['kind']:<12} {_when(float(r['created'])):<19}  "  # type: ignore[arg-type]
                   f"{str(r['created_by'])[:16]:<16} {r['key_fingerprint'] or '-'}")


@app.command("remove")
@admin_command
def remove(
    name: Annotated[str, typer.Argument(help="The identity to remove.")],
    *,
    client: AdminClient,
) -> None:
    """Remove an identity: its token or key is refused from the next call on."""
    gone = client.call("RemoveAdmin", pb.RemoveAdminRequest(name=name))
    typer.echo(f"removed {gone.name} (role {gone.role}, {gone.kind}); refused from now on")  # type: ignore[attr-defined]


@app.command("audit")
@admin_command
def audit(
    last: Annotated[int, typer.Option("--last", min=1, help="How many of the latest calls to show.")] = 20,
    who: Annotated[str | None, typer.Option("--who", help="Only this identity's calls.")] = None,
    *,
    client: AdminClient,
    fmt: FormatOpt = Format.text,
) -> None:
    """Show the latest admin calls from the audit log (DIR/audit.jsonl): who, what, when, outcome."""
    reply = client.call("ReadAudit", pb.ReadAuditRequest(limit=last, who=who or ""))
    lines = list(reply.lines)  # type: ignore[attr-defined]
    if fmt == Format.json:
        for line in lines:
            typer.echo(line)
        return
    typer.echo(f"{'TIME (UTC)':<24} {'WHO':<16} {'ROLE':<8} {'METHOD':<14} {'OUTCOME':<9} DETAIL")
    for line in lines:
        r = json.loads(line)
        detail = r.get("message") or json.dumps(r.get("result") or r.get("request") or {}, separators=(",", ":"))
        typer.echo(f"{r['time']:<24} {str(r['who'])[:16]:<16} {r['role'] or '-':<8} {r['method']:<14} "
                   f"{r['outcome']:<9} {detail}")
