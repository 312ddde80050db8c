"""Files of the coordinator's node that a compute actor on another node reads, sent through Ray.

A base's compute actor reads more than the weights that the object store already holds: the
base's config and tokenizer, each job's eval data and, for offsite jobs, the emulator. Those are
paths on the coordinator's disk. When the actor runs on the coordinator's node they are read in
place; on another node their bytes travel once through the object store and are written to a
cache on that node (named by their content hash, so every actor there shares one copy and a
changed file never reuses a stale one). Engine actors, which open the state dir's SQLite database,
never leave the coordinator's node and need none of this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.coordinator.state import Job
from fedtune.errors import InvalidInput
from fedtune.spec import JobSpec

log = logging.getLogger(__name__)

# Weights: the base's come from the object store (shared_base), never as files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
CACHE_ENV = "FEDTUNE_NODE_FILES_DIR"


@dataclass(frozen=True)
class NodeFiles:
    """A file or directory of the coordinator's node, readable from any node (see :func:`local`)."""

    path: str  # on the coordinator's node
    origin: str  # that node's Ray id
    digest: str = ""  # sha256 of the names and contents sent; names the copy on other nodes
    ref: list[Any] | None = None  # [ObjectRef of {relative name: bytes}]; None: read in place
    directory: bool = False

    @property
    def shipped(self) -> bool:
        """Whether the bytes travel (the reader is on another node)."""
        return self.ref is not None


def _collect(path: Path, skip_weights: bool) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    if not path.is_dir():
        raise InvalidInput(f"{path} does not exist on the coordinator's node")
    files: dict[str, bytes] = {}
    for f in sorted(path.rglob("*")):
        if not f.is_file() or (skip_weights and f.name.endswith(WEIGHT_SUFFIXES)):
            continue
        files[f.relative_to(path).as_posix()] = f.read_bytes()
    return files


def share(ray: Any, path: str | Path, origin: str, to_node: str, *, skip_weights: bool = False) -> NodeFiles:
    """``path`` (on ``origin``, this process's node) for a reader on ``to_node``: sent through the
    object store only when that is another node. ``skip_weights`` leaves weight files out (a base's
    weights are already in the object store)."""
    if to_node == origin:
        return NodeFiles(str(path), origin)
    files = _collect(Path(path), skip_weights)
    digest = hashlib.sha256()
    for name, data in files.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    log.info("sending %s (%d files, %d bytes) to node %s through the object store", path, len(files),
             sum(len(d) for d in files.values()), to_node[:8])
    return NodeFiles(str(path), origin, digest.hexdigest(), [ray.put(files)], Path(path).is_dir())


def cache_root() -> Path:
    """Where shipped files are written on a node (``FEDTUNE_NODE_FILES_DIR``, else the temp dir)."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "fedtune-node-files")


def local(files: NodeFiles) -> Path:
    """In a Ray worker: the path to read ``files`` at on this node (a copy written once per node)."""
    if files.ref is None:
        return Path(files.path)
    name = Path(files.path).name
    home = cache_root() / files.digest[:32]
    if (home / ".complete").is_file():
        return home / name
    import ray

    contents: dict[str, bytes] = ray.get(files.ref[0], timeout=600)
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=home.parent))
    root = staging / name if files.directory else staging
    for rel, data in contents.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (staging / ".complete").write_text(files.path)
    try:
        staging.rename(home)
    except OSError:  # another actor on this node wrote the same content first
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s from the coordinator's node to %s", files.path, home)
    return home / name


@dataclass(frozen=True)
class JobFiles:
    """What evaluating a job reads from the coordinator's disk besides the base."""

    eval_data: NodeFiles | None = None
    emulator: NodeFiles | None = None


def job_files(ray: Any, job: Job, origin: str, to_node: str) -> JobFiles | None:
    """A job's eval data and emulator for a reader on ``to_node`` (None when it is ``origin``)."""
    if to_node == origin:
        return None
    spec = JobSpec.stored(job.spec_json)
    return JobFiles(share(ray, spec.eval_data, origin, to_node) if spec.eval_data else None,
                    share(ray, job.emulator_dir, origin, to_node) if job.emulator_dir else None)


def localized(job: Job, files: JobFiles | None) -> Job:
    """``job`` with its eval data and emulator at their paths on this node."""
    if files is None:
        return job
    changes: dict[str, Any] = {}
    if files.eval_data is not None:
        spec = JobSpec.stored(job.spec_json)
        changes["spec_json"] = spec.model_copy(update={"eval_data": str(local(files.eval_data))}).model_dump_json()
    if files.emulator is not None:
        changes["emulator_dir"] = str(local(files.emulator))
    return dataclasses.replace(job, **changes)
