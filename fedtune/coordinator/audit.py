"""The audit log: one JSON line per admin call (who, what, when, outcome), refusals included.

``audit.jsonl`` in the state dir is opened for appending only; each record is one ``write`` of a
whole line followed by ``fsync``, so a line is on disk before the next call is logged and a crash
can cut at most the line being written. Secrets never enter it: tokens appear as their ids, keys
and long fields as hashes (see :func:`describe`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedtune.coordinator.state import TOKEN_ID_LEN, token_id

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
# Request fields that hold a secret: logged as the secret's non-secret id.
_SECRET_FIELDS = frozenset({"token"})
# Reply fields worth recording (a whitelist: a reply can carry a fresh secret, as CreateToken's does).
_RESULT_FIELDS = ("job_id", "token_id", "round", "clients")
_LONG_TEXT = 200
# What one ReadAudit reply may carry: well under the 4 MiB message limit.
MAX_READ_BYTES = 3 * 1024 * 1024


@dataclass(frozen=True)
class AuditRecord:
    """One admin call: who made it, with what credential and role, what it asked, and how it ended."""

    who: str
    auth: str  # admin-token, token, key, or none
    role: str  # the caller's role, '' when unauthenticated
    method: str
    request: dict[str, Any]
    outcome: str  # ok, denied, error, cancelled
    code: str  # the gRPC status name
    message: str = ""
    result: dict[str, Any] | None = None
    peer: str = ""

    def line(self, now: float) -> str:
        """The JSON line for this record (time first, for people reading the file)."""
        when = datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        doc: dict[str, Any] = {"time": when, "unix": round(now, 3), "who": self.who, "auth": self.auth,
                               "role": self.role, "method": self.method, "request": self.request,
                               "outcome": self.outcome, "code": self.code}
        if self.message:
            doc["message"] = self.message
        if self.result:
            doc["result"] = self.result
        if self.peer:
            doc["peer"] = self.peer
        return json.dumps(doc, sort_keys=False, separators=(",", ":")) + "\n"


def describe(message: Any) -> dict[str, Any]:
    """What a request asked, without secrets: its set scalar fields, a token as its id, bytes and
    long text as their sha256 and size."""
    out: dict[str, Any] = {}
    if message is None or not hasattr(message, "ListFields"):
        return out
    for field, value in message.ListFields():
        name = field.name
        if name in _SECRET_FIELDS and isinstance(value, str):
            out[name + "_id"] = value if len(value) <= TOKEN_ID_LEN else token_id(value)
        elif isinstance(value, bytes):
            out[name] = {"sha256": hashlib.sha256(value).hexdigest()[:16], "bytes": len(value)}
        elif isinstance(value, str) and len(value) > _LONG_TEXT:
            out[name] = {"sha256": hashlib.sha256(value.encode()).hexdigest()[:16], "bytes": len(value.encode())}
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
    return out


def result_of(reply: Any) -> dict[str, Any]:
    """The non-secret identifiers a reply carries (a new job's id, a token's id, ...)."""
    if reply is None or not hasattr(reply, "ListFields"):
        return {}
    return {f.name: v for f, v in reply.ListFields()
            if f.name in _RESULT_FIELDS and isinstance(v, (str, int, float, bool))}


class AuditLog:
    """Appends records to ``audit.jsonl`` and reads them back."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / AUDIT_FILE
        self._lock = threading.Lock()
        self.path.touch(mode=0o600, exist_ok=True)

    def append(self, record: AuditRecord) -> None:
        """Writes one line and fsyncs it. A failure is logged, never raised: the call it records has
        already run (or been refused), and its caller's answer must not depend on the disk."""
        data = record.line(time.time()).encode()
        with self._lock:
            try:
                # Opened per record (admin calls are few), so no handle outlives the coordinator;
                # O_APPEND: the coordinator only ever adds to the end.
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                log.exception("cannot write the audit log %s: %s %s by %s went unrecorded",
                              self.path, record.method, record.outcome, record.who)

    def tail(self, limit: int, who: str = "") -> tuple[list[str], bool]:
        """The last ``limit`` lines (0: all), oldest first, optionally only ``who``'s, within
        :data:`MAX_READ_BYTES`. Returns (lines, whether older matching lines were left out).
        Reads from the end, so the cost follows what is asked, not the size of the log."""
        picked: list[str] = []
        size = 0
        for line in _lines_backwards(self.path):
            if who and _who(line) != who:
                continue
            if (limit and len(picked) >= limit) or size + len(line) > MAX_READ_BYTES:
                return picked[::-1], True
            picked.append(line)
            size += len(line) + 1
        return picked[::-1], False


def _lines_backwards(path: Path, block: int = 1 << 16) -> Iterator[str]:
    """The lines of a file, last first (a final line without its newline included)."""
    with path.open("rb") as f:
        pos = f.seek(0, os.SEEK_END)
        rest = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            parts = (f.read(step) + rest).split(b"\n")
            rest = parts[0]
            for raw in reversed(parts[1:]):
                if raw:
                    yield raw.decode(errors="replace")
        if rest:
            yield rest.decode(errors="replace")


def _who(line: str) -> str:
    try:
        return str(json.loads(line).get("who", ""))
    except ValueError:
        return ""
