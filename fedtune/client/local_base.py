"""A base model the data owner already has: checked file by file against the job's, never downloaded.

``fedtune client run --base-dir DIR`` points at a model directory or at a Hugging Face hub cache
(``~/.cache/huggingface/hub``, whose ``models--ORG--NAME/snapshots/REV`` folders each hold one
snapshot). Every file the task lists is hashed and compared with the coordinator's sha256; the
first one that differs or is missing is named and nothing is trained. Hashes are remembered per
file (by path, size, modification time and inode) in the client's state dir, so a 15 GB base is
hashed once, not every start.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import InvalidInput
from fedtune.hashing import file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseFile:
    """One file of the job's base, as the coordinator lists it."""

    path: str
    sha256: str
    size: int


class HashMemo:
    """sha256 of local files, kept while a file's size, mtime and inode stay the same."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._known: dict[str, list[object]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._known = {}

    def sha256(self, file: Path) -> str:
        """The file's digest, from the memo when the file has not changed."""
        real = file.resolve()
        st = real.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self._known.get(str(real))
        if entry is not None and entry[:3] == stamp:
            return str(entry[3])
        digest = file_sha256(real)
        self._known[str(real)] = [*stamp, digest]
        return digest

    def save(self) -> None:
        """Writes the memo (atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._known))
        os.replace(tmp, self.path)


def _candidates(base_dir: Path) -> list[Path]:
    """Model directories under ``base_dir``: itself, or each snapshot of a hub cache."""
    if (base_dir / "config.json").is_file():
        return [base_dir]
    snapshots = sorted(base_dir.glob("models--*/snapshots/*")) + sorted(base_dir.glob("snapshots/*"))
    return [s for s in snapshots if (s / "config.json").exists()]


def _first_difference(model_dir: Path, files: Sequence[BaseFile], memo: HashMemo) -> str | None:
    """What makes ``model_dir`` differ from the job's base (the file and how), or None."""
    for f in files:
        local = model_dir / f.path
        if not local.is_file():
            return f"{f.path} is missing"
        size = local.stat().st_size
        if size != f.size:
            return f"{f.path} has {size} bytes, the job's has {f.size}"
    for f in files:
        if memo.sha256(model_dir / f.path) != f.sha256:
            return f"{f.path} differs from the job's (sha256 {f.sha256[:12]}...)"
    return None


def verified_base(base_dir: Path, files: Sequence[BaseFile], target: Path, memo_path: Path) -> Path:
    """Finds the job's base in ``base_dir``, checks every file, and lays it out as ``target``.

    ``target`` gets a symbolic link per listed file, so the model loaded is exactly the files that
    were checked (a snapshot's other files, ``.bin`` duplicates say, are not seen by the loader).

    Args:
        base_dir: A model directory or a hub cache.
        files: The task's base files.
        target: Where to lay the checked files out (in the client's state dir).
        memo_path: The hash memo's file.

    Returns:
        ``target``.

    Raises:
        InvalidInput: No directory there matches; the first difference is named.
    """
    for f in files:
        if Path(f.path).is_absolute() or ".." in Path(f.path).parts:
            raise InvalidInput(f"artifact path {f.path!r} escapes the model directory")
    base_dir = base_dir.expanduser()
    if not base_dir.is_dir():
        raise InvalidInput(f"--base-dir {base_dir}: no such directory")
    candidates = _candidates(base_dir)
    if not candidates:
        raise InvalidInput(f"--base-dir {base_dir}: neither a model directory (no config.json) nor a hub cache "
                           "(no models--*/snapshots/*)")
    memo = HashMemo(memo_path)
    problems = []
    try:
        for model_dir in candidates:
            problem = _first_difference(model_dir, files, memo)
            if problem is None:
                _link(model_dir, files, target)
                log.info("using the base in %s (%d files checked)", model_dir, len(files))
                return target
            problems.append((model_dir, problem))
    finally:
        memo.save()
    model_dir, problem = problems[0]
    more = f" (and {len(problems) - 1} other snapshot(s) differ too)" if len(problems) > 1 else ""
    raise InvalidInput(f"--base-dir {model_dir} is not the job's base: {problem}{more}; nothing was trained")


def _link(model_dir: Path, files: Sequence[BaseFile], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    wanted = {f.path for f in files}
    for old in target.iterdir():
        if old.name not in wanted and (old.is_symlink() or old.is_file()):
            old.unlink()
    for f in files:
        dest = target / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        source = (model_dir / f.path).resolve()
        if dest.is_symlink() or dest.exists():
            if dest.is_symlink() and Path(os.readlink(dest)) == source:
                continue
            dest.unlink()
        dest.symlink_to(source)
