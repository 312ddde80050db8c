"""What the `fedtune adapters` commands share: resolving a reference and pulling a round through the admin API."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import grpc

from fedtune.adapters import verify_adapter_dir
from fedtune.cli.admin_client import AdminClient
from fedtune.errors import InvalidInput
from fedtune.protos import fedtune_pb2 as pb
from fedtune.registry import PublishedAdapter, Ref, adapter_from_row, parse_ref, pick


def listed(client: AdminClient, job: str = "", tag: str = "") -> list[tuple[PublishedAdapter, dict[str, Any]]]:
    """(adapter, manifest) of every published round (of one job, or carrying one tag)."""
    reply = client.call("ListAdapters", pb.ListAdaptersRequest(job_id=job, tag=tag))
    return [(adapter_from_row(a.job_id, a.round, a.path, a.manifest_json, a.tags), json.loads(a.manifest_json))
            for a in reply.adapters]  # type: ignore[attr-defined]


def resolve(client: AdminClient, ref: str | Ref) -> tuple[PublishedAdapter, dict[str, Any], list[dict[str, Any]]]:
    """(adapter, its manifest, the manifests of every round of its job) that ``ref`` names.

    Raises:
        InvalidInput: a malformed reference.
        NotFound: no such job, round or tag (the coordinator's answer for an unknown job).
    """
    r = parse_ref(ref) if isinstance(ref, str) else ref
    rows = listed(client, r.job)
    found = pick([a for a, _ in rows], r, job_known=True)
    manifest = next(m for a, m in rows if a.round == found.round)
    return found, manifest, [m for _, m in rows]


def pull_into(client: AdminClient, job: str, rnd: int, out: Path, tag: str = "") -> int:
    """Downloads round ``rnd`` (0: the latest, or what ``tag`` names) of ``job`` into ``out``, verified
    against the coordinator's key before it replaces ``out``. Returns the round pulled.

    Raises:
        InvalidInput: a file with an unsafe name, or files or signature that do not verify.
    """
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    got_round = 0
    try:
        request = pb.PullAdapterRequest(job_id=job, round=rnd, tag=tag)
        for msg in client.stream("PullAdapter", request):  # type: ignore[attr-defined]
            name = os.path.basename(msg.path)
            if name != msg.path or name.startswith("."):
                raise InvalidInput(f"coordinator sent a file with an unsafe name {msg.path!r}")
            with (tmp / name).open("ab") as f:
                f.write(msg.chunk.data)
            got_round = msg.round
    except grpc.RpcError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise client.error(e) from e
    except InvalidInput:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        verify_adapter_dir(tmp, client.signing_key())
    except InvalidInput:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return got_round
