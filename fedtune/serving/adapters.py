"""Which adapters `fedtune serve` can serve, and the ones resident in the engine (verified, LRU).

A model id names an adapter the way the registry does: ``JOB@ROUND``, ``JOB@TAG`` or ``JOB`` (its
latest round). Every request resolves its id again, so a round published or a tag moved while the
server runs is what the next request gets; resolving reads the registry (a directory listing and a
read-only SQLite query), not the adapter's tensors.

Before an adapter first reaches the engine it is copied into the server's own work directory and
the copy is verified with :func:`fedtune.adapters.verify_adapter_dir` (the manifest's signature by
the coordinator's key, every file's sha256), so the bytes the engine loads are the bytes that were
verified even if the published directory changes meanwhile. One that fails is never served; the
failure is remembered (and logged once) until its files change.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedtune.adapters import MANIFEST, verify_adapter_dir
from fedtune.errors import FedtuneError, InvalidInput, LimitExceeded, NotFound, Unavailable
from fedtune.registry import PublishedAdapter, list_published, pick, resolve
from fedtune.serving.http_errors import AdapterRejected

log = logging.getLogger(__name__)

# The id under which the base model, without any adapter, is served and listed.
BASE_MODEL_ID = "base"


class AdapterSource(Protocol):
    """Where published adapters are found."""

    def published(self) -> list[PublishedAdapter]:
        """Every published adapter, with its tags."""
        ...

    def resolve(self, ref: str) -> PublishedAdapter:
        """The adapter ``JOB@ROUND``, ``JOB@TAG`` or ``JOB`` (latest) names; NotFound when none."""
        ...


@dataclass(frozen=True)
class StateDirSource:
    """The adapters a coordinator published into its state dir, with their tags (the registry)."""

    state_dir: Path

    def published(self) -> list[PublishedAdapter]:
        """See :class:`AdapterSource`."""
        return list_published(self.state_dir)

    def resolve(self, ref: str) -> PublishedAdapter:
        """See :class:`AdapterSource`."""
        return resolve(self.state_dir, ref)


@dataclass(frozen=True)
class DirsSource:
    """Pulled adapter directories (``fedtune adapters pull --out DIR``), without tags.

    Each path is an adapter directory or a folder holding them (one or two levels down, as
    ``JOB/round-N``); folders are listed again on every call, so an adapter pulled into one while
    the server runs is served without a restart.
    """

    roots: tuple[Path, ...]

    def check(self) -> None:
        """Raises InvalidInput naming a path that is neither an adapter nor a folder of adapters."""
        for root in self.roots:
            if not root.is_dir():
                raise InvalidInput(f"--adapters {root}: no such directory")

    def published(self) -> list[PublishedAdapter]:
        """See :class:`AdapterSource`."""
        found: dict[tuple[str, int], PublishedAdapter] = {}
        for root in self.roots:
            for path in _adapter_dirs(root):
                try:
                    manifest = json.loads((path / MANIFEST).read_text())
                    key = (str(manifest["job"]), int(manifest["round"]))
                except (OSError, ValueError, KeyError, TypeError):
                    log.warning("%s: unreadable %s; skipped", path, MANIFEST)
                    continue
                found.setdefault(key, PublishedAdapter(job=key[0], round=key[1], path=path, tags=()))
        return sorted(found.values(), key=lambda a: (a.job, a.round))

    def resolve(self, ref: str) -> PublishedAdapter:
        """See :class:`AdapterSource` (pulled adapters have no tags: ``JOB@ROUND`` or ``JOB``)."""
        return pick(self.published(), ref)


def _adapter_dirs(root: Path) -> list[Path]:
    if (root / MANIFEST).is_file():
        return [root]
    out = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / MANIFEST).is_file():
            out.append(child)
        else:
            out.extend(sorted(g for g in child.iterdir() if g.is_dir() and (g / MANIFEST).is_file()))
    return out


class AdapterEngine(Protocol):
    """The part of :class:`fedtune.serving.engine.GenerationEngine` the pool drives."""

    def add_adapter(self, name: str, adapter_dir: Path) -> None: ...
    def remove_adapter(self, name: str) -> None: ...


@dataclass(frozen=True)
class Lease:
    """A request's hold on a model: the engine's name for its adapter (None: the base alone)."""

    model: str
    engine_name: str | None
    canonical: str


@dataclass
class _Resident:
    canonical: str
    engine_name: str
    fingerprint: tuple[Any, ...]
    copy_dir: Path
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    retired: bool = False


def _copy_listed(src: Path, dst: Path) -> None:
    """Copies the manifest and the files it lists (only those: nothing unlisted reaches the engine).

    Names that are not plain file names are not copied; verification then refuses the adapter.
    """
    dst.mkdir(parents=True)
    if not (src / MANIFEST).is_file():
        return  # verification names what is missing
    shutil.copyfile(src / MANIFEST, dst / MANIFEST)
    try:
        files = json.loads((dst / MANIFEST).read_text()).get("files")
    except (ValueError, AttributeError):
        return  # verification names the broken manifest
    for name in files if isinstance(files, dict) else ():
        safe = isinstance(name, str) and name and "/" not in name and "\\" not in name and not name.startswith(".")
        if safe and (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _fingerprint(path: Path) -> tuple[Any, ...]:
    """Cheap identity of a directory's content: each file's name, size, mtime and inode."""
    try:
        return tuple(sorted((p.name, (s := p.stat()).st_size, s.st_mtime_ns, s.st_ino)
                            for p in path.iterdir() if p.is_file()))
    except OSError:
        return ()


class AdapterPool:
    """Adapters resident in the engine: loaded on demand, verified first, evicted least recently used.

    Runs on the server's event loop; copying, verifying and loading run in a worker thread. An
    adapter being used by a request is never evicted; a republished round (its files changed) is
    loaded beside the old copy, which leaves the engine when its last request ends.
    """

    def __init__(self, engine: AdapterEngine, source: AdapterSource, *, public_key: str, base_hash: str,
                 max_adapters: int, work_dir: Path, on_change: Callable[[int], None] | None = None) -> None:
        self.engine = engine
        self.source = source
        self.public_key = public_key
        self.base_hash = base_hash
        self.max_adapters = max_adapters
        self.work_dir = work_dir
        self._on_change = on_change or (lambda _n: None)
        self._resident: dict[str, _Resident] = {}
        self._retired: dict[str, _Resident] = {}
        self._failed: dict[str, tuple[tuple[Any, ...], str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._manifests: dict[Path, tuple[float, dict[str, Any]]] = {}
        self._generation = itertools.count(1)

    @property
    def resident(self) -> list[str]:
        """``JOB@ROUND`` of every adapter in the engine now."""
        return sorted(self._resident)

    # ------------------------------------------------------------------ listing
    def servable(self) -> list[tuple[PublishedAdapter, dict[str, Any]]]:
        """Published adapters on this server's base that are not known to fail verification, with
        their (unverified) manifests, for ``/v1/models``."""
        out = []
        for adapter in self.source.published():
            canonical = adapter.ref
            failed = self._failed.get(canonical)
            if failed is not None and failed[0] == _fingerprint(adapter.path):
                continue
            manifest = self._manifest(adapter.path)
            if manifest is not None and manifest.get("base_model_hash") == self.base_hash:
                out.append((adapter, manifest))
        return out

    def _manifest(self, path: Path) -> dict[str, Any] | None:
        try:
            mtime = (path / MANIFEST).stat().st_mtime_ns
            cached = self._manifests.get(path)
            if cached is None or cached[0] != mtime:
                cached = self._manifests[path] = (mtime, json.loads((path / MANIFEST).read_text()))
            return cached[1]
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ leases
    async def acquire(self, model: str) -> Lease:
        """Resolves ``model`` and makes its adapter resident and verified.

        Raises:
            NotFound: no such adapter.
            AdapterRejected: it fails verification or is for another base (never served).
            LimitExceeded: every resident adapter is in use and none can make room.
        """
        if model == BASE_MODEL_ID:
            return Lease(model, None, BASE_MODEL_ID)
        try:
            adapter = self.source.resolve(model)
        except FedtuneError as e:
            raise NotFound(f"the model '{model}' does not exist: {e}; GET /v1/models lists what this server "
                           f"serves ('{BASE_MODEL_ID}' is the base without an adapter)") from e
        canonical = adapter.ref
        lock = self._locks.setdefault(canonical, asyncio.Lock())
        async with lock:
            fp = _fingerprint(adapter.path)
            entry = self._resident.get(canonical)
            if entry is None or entry.fingerprint != fp:
                failed = self._failed.get(canonical)
                if failed is not None and failed[0] == fp:
                    raise AdapterRejected(failed[1])
                entry = await self._load(model, adapter, canonical, fp)
            entry.users += 1
            entry.last_used = time.monotonic()
        return Lease(model, entry.engine_name, canonical)

    def release(self, lease: Lease) -> None:
        """Ends a request's hold (call once per :meth:`acquire`)."""
        if lease.engine_name is None:
            return
        entry = self._resident.get(lease.canonical)
        if entry is None or entry.engine_name != lease.engine_name:
            entry = self._retired.get(lease.engine_name)
        if entry is None:
            return
        entry.users -= 1
        entry.last_used = time.monotonic()
        if entry.retired and entry.users == 0:
            self._unload(entry)

    async def _load(self, model: str, adapter: PublishedAdapter, canonical: str, fp: tuple[Any, ...]) -> _Resident:
        stale = self._resident.pop(canonical, None)
        if stale is not None:
            log.info("adapter %s changed on disk; loading it again", canonical)
            self._retire(stale)
        self._make_room()
        generation = next(self._generation)
        engine_name = f"{canonical}#{generation}"
        # Named by number only: a job id read from an unverified manifest never becomes a path.
        copy_dir = self.work_dir / f"adapter-{generation}"
        try:
            await asyncio.to_thread(self._verify_and_add, adapter, canonical, engine_name, copy_dir)
        except AdapterRejected as e:
            self._failed[canonical] = (fp, str(e))
            log.warning("%s", e)
            raise
        entry = _Resident(canonical, engine_name, fp, copy_dir)
        self._resident[canonical] = entry
        self._failed.pop(canonical, None)
        log.info("adapter %s verified and loaded (%d resident)", canonical, len(self._resident))
        self._on_change(len(self._resident))
        return entry

    def _verify_and_add(self, adapter: PublishedAdapter, canonical: str, engine_name: str, copy_dir: Path) -> None:
        """Copies, verifies and loads (in a worker thread)."""
        shutil.rmtree(copy_dir, ignore_errors=True)
        try:
            _copy_listed(adapter.path, copy_dir)
        except OSError as e:  # a round being republished (renamed into place) as we copy
            shutil.rmtree(copy_dir, ignore_errors=True)
            raise Unavailable(f"adapter {canonical} could not be read ({e}); try again") from e
        try:
            manifest = verify_adapter_dir(copy_dir, self.public_key)
            if (manifest.get("job"), manifest.get("round")) != (adapter.job, adapter.round):
                raise InvalidInput(f"its signed manifest names {manifest.get('job')}@{manifest.get('round')}")
            if manifest.get("base_model_hash") != self.base_hash:
                raise InvalidInput(f"it was trained on another base (hash {str(manifest.get('base_model_hash'))[:12]}, "
                                   f"this server's is {self.base_hash[:12]}); serve it with that --base")
            self.engine.add_adapter(engine_name, copy_dir)
        except (FedtuneError, ValueError) as e:
            shutil.rmtree(copy_dir, ignore_errors=True)
            raise AdapterRejected(f"adapter {canonical} ({adapter.path}) is not served: {e}") from e

    def _make_room(self) -> None:
        while len(self._resident) >= self.max_adapters:
            idle = [e for e in self._resident.values() if e.users == 0]
            if not idle:
                raise LimitExceeded(f"all {self.max_adapters} resident adapters are serving requests "
                                    "(--max-adapters); try again shortly")
            victim = min(idle, key=lambda e: e.last_used)
            del self._resident[victim.canonical]
            log.info("adapter %s evicted (least recently used)", victim.canonical)
            self._unload(victim)
            self._on_change(len(self._resident))

    def _retire(self, entry: _Resident) -> None:
        entry.retired = True
        if entry.users == 0:
            self._unload(entry)
        else:
            self._retired[entry.engine_name] = entry
        self._on_change(len(self._resident))

    def _unload(self, entry: _Resident) -> None:
        self._retired.pop(entry.engine_name, None)
        self.engine.remove_adapter(entry.engine_name)
        shutil.rmtree(entry.copy_dir, ignore_errors=True)

    def close(self) -> None:
        """Removes the work copies."""
        for entry in [*self._resident.values(), *self._retired.values()]:
            shutil.rmtree(entry.copy_dir, ignore_errors=True)


def model_ids(adapter: PublishedAdapter) -> Sequence[str]:
    """The ids an adapter is listed under: ``JOB@ROUND`` and ``JOB@TAG`` for each tag."""
    return [adapter.ref, *(f"{adapter.job}@{t}" for t in adapter.tags)]
