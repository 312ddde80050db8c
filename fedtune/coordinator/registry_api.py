"""Admin API handlers of the adapter registry: tags, tag-filtered listing, pulling by tag.

The servicer (:mod:`fedtune.coordinator.admin_api`) hands these requests here; tags are kept in
the coordinator's SQLite state (:mod:`fedtune.registry.tags`), so they survive a restart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.errors import InvalidInput
from fedtune.protos import fedtune_pb2 as pb
from fedtune.registry import Ref, adapter_from_row, pick
from fedtune.registry.tags import LATEST, TagMove

if TYPE_CHECKING:
    from fedtune.coordinator.service import Coordinator

log = logging.getLogger(__name__)


def _reply(move: TagMove) -> pb.TagAdapterReply:
    return pb.TagAdapterReply(job_id=move.job_id, tag=move.tag, round=move.round or 0,
                              previous_round=move.previous or 0)


def tag_adapter(co: Coordinator, request: pb.TagAdapterRequest) -> pb.TagAdapterReply:
    """Points a tag at a published round (NOT_FOUND for a round that is not published)."""
    move = co.state.tags.set(request.job_id, request.round, request.tag)
    log.info("tag %s of job %s: round %s -> %s", move.tag, move.job_id, move.previous, move.round)
    return _reply(move)


def untag_adapter(co: Coordinator, request: pb.UntagAdapterRequest) -> pb.TagAdapterReply:
    """Removes a tag (NOT_FOUND for a tag the job does not have)."""
    move = co.state.tags.remove(request.job_id, request.tag)
    log.info("tag %s of job %s removed (was round %s)", move.tag, move.job_id, move.previous)
    return _reply(move)


def list_adapters(co: Coordinator, request: pb.ListAdaptersRequest) -> pb.ListAdaptersReply:
    """Published rounds with their tags; ``request.tag`` keeps only the rounds it points at."""
    if request.job_id:
        co.state.job(request.job_id)
    rows = co.state.published(request.job_id or None)
    tags = co.state.tags.by_round(request.job_id or None)
    out = []
    for j, r, p, m in rows:
        t = tags.get((j, r), ())
        if request.tag and request.tag != LATEST and request.tag not in t:
            continue
        out.append(pb.AdapterInfo(job_id=j, round=r, path=p, manifest_json=m, tags=list(t)))
    if request.tag == LATEST:
        latest: dict[str, pb.AdapterInfo] = {a.job_id: a for a in out}
        out = list(latest.values())
    return pb.ListAdaptersReply(adapters=out)


def pull_target(co: Coordinator, request: pb.PullAdapterRequest) -> tuple[int, Path, dict[str, Any]]:
    """(round, directory, manifest) a pull names: a round, a tag, or (neither) the latest."""
    if not request.tag:
        return co.adapter_dir(request.job_id, request.round)
    if request.round:
        raise InvalidInput("pull names either a round or a tag, not both")
    co.state.job(request.job_id)
    tags = co.state.tags.by_round(request.job_id)
    adapters = [adapter_from_row(j, r, p, m, tags.get((j, r), ())) for j, r, p, m in co.state.published(request.job_id)]
    tag = None if request.tag == LATEST else request.tag
    found = pick(adapters, Ref(request.job_id, tag=tag), job_known=True)
    return co.adapter_dir(request.job_id, found.round)

