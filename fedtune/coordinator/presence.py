"""Which clients are connected: kept in memory, since it only matters while the process runs.

After a coordinator restart every client counts as away until its next heartbeat, which agents
send every few seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from fedtune.coordinator.state import Client

# Clients poll for tasks at this interval, so it bounds how long a new round waits to be noticed.
DEFAULT_HEARTBEAT_SECONDS = 1
# A client missing this many heartbeats in a row is treated as gone.
MISSED_HEARTBEATS = 6


class Presence:
    """Last heartbeat time of each client."""

    def __init__(self, heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS) -> None:
        self.heartbeat_seconds = heartbeat_seconds
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def touch(self, client_id: str) -> None:
        """Records a heartbeat."""
        with self._lock:
            self._seen[client_id] = time.time()

    def last_seen(self, client_id: str) -> float | None:
        """When the client was last heard from, or None."""
        with self._lock:
            return self._seen.get(client_id)

    def is_live(self, client_id: str) -> bool:
        """Whether the client sent a heartbeat recently."""
        seen = self.last_seen(client_id)
        return seen is not None and time.time() - seen <= self.heartbeat_seconds * MISSED_HEARTBEATS

    def live(self, clients: Iterable[Client]) -> list[str]:
        """Ids of the live clients among ``clients``."""
        return [c.client_id for c in clients if self.is_live(c.client_id)]
