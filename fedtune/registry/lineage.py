"""Lineage of a published round: where it came from, recorded in its signed ``fedtune.json``.

Most of it was in the manifest before lineage had a name (``job``, ``base_model_hash``,
``contributors``, ``aggregation.strategy``, ``peft.method``, ``metrics``); publication adds the
rest under ``lineage``: the sha256 of the job's spec and the round whose adapter this round
started from. :func:`lineage_of` reads all of it back, from old manifests too (their missing
fields are None), and the signature covers every field, so lineage cannot be edited unseen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.coordinator.state import CoordinatorState, Job, Round


def spec_sha256(spec_json: str) -> str:
    """The sha256 of a job's stored spec (the canonical JSON the coordinator keeps)."""
    return hashlib.sha256(spec_json.encode()).hexdigest()


def publication_lineage(state: CoordinatorState, job: Job, rnd: Round) -> dict[str, Any]:
    """The ``lineage`` block round ``rnd`` of ``job`` publishes.

    ``parent_round`` is the round whose aggregate this round's clients trained from (0: the job's
    initial adapter), found by the global adapter's hash, so it is right in asynchronous jobs too.
    """
    parent: int | None = None
    if rnd.global_in == job.initial_adapter:
        parent = 0
    else:
        for r in state.rounds(job.job_id):
            if r.round < rnd.round and r.global_out == rnd.global_in:
                parent = r.round
    return {"spec_sha256": spec_sha256(job.spec_json), "parent_round": parent}


@dataclass(frozen=True)
class Lineage:
    """A published round's lineage as its manifest records it (None: an older manifest lacks it)."""

    job: str
    round: int
    spec_sha256: str | None
    parent_round: int | None
    base_model: str
    base_model_hash: str
    contributors: int
    strategy: str | None
    method: str
    metrics: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None


def section(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    """A manifest's ``key`` block, or ``{}`` when it is missing or not an object (older manifests)."""
    value = manifest.get(key)
    return value if isinstance(value, dict) else {}


def lineage_of(manifest: dict[str, Any]) -> Lineage:
    """The lineage a parsed ``fedtune.json`` records."""
    block = section(manifest, "lineage")
    aggregation = section(manifest, "aggregation")
    peft = section(manifest, "peft")
    privacy = section(manifest, "privacy")
    metrics = section(manifest, "metrics")
    eps = privacy.get("epsilon", metrics.get("epsilon"))
    parent = block.get("parent_round")
    return Lineage(
        job=str(manifest.get("job", "")),
        round=int(manifest.get("round", 0)),
        spec_sha256=block.get("spec_sha256"),
        parent_round=int(parent) if parent is not None else None,
        base_model=str(manifest.get("base_model", "")),
        base_model_hash=str(manifest.get("base_model_hash", "")),
        contributors=int(manifest.get("contributors", 0)),
        strategy=aggregation.get("strategy"),
        method=str(peft.get("method", "lora")),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        epsilon=float(eps) if isinstance(eps, (int, float)) else None,
    )
