"""One loaded model per simulation worker process, handed from one virtual client to the next.

A worker runs virtual clients one after another (:mod:`fedtune.simulation.pool`). Each is a fresh
agent with its own identity, data and state dir, but they all train the same job on the same base,
so the peft model one of them built is what the next would build: the process keeps it. Handing it
on is exact: every use starts by writing the whole adapter state the client starts from
(:func:`fedtune.peft_io.load_adapter_state` refuses a partial one), the base is frozen, and the
optimizer is made per round. Uses are serialized with :attr:`SharedModel.lock`: two virtual
clients of one process never train the one model at once.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class SharedModel:
    """The process's one cached model, by a key naming everything its build depends on."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._key: str | None = None
        self._model: Any = None
        self.builds = 0  # models built in this process, for tests and logs
        self.reuses = 0

    def get(self, key: dict[str, Any], build: Callable[[], Any]) -> Any:
        """The model for ``key``, built with ``build`` when the cached one is for another key.

        The caller holds :attr:`lock` for as long as it uses the model.
        """
        text = json.dumps(key, sort_keys=True, default=str)
        with self.lock:
            if self._key == text:
                self.reuses += 1
                return self._model
            self._key, self._model = None, None  # let the old one go before loading another
            self._model = build()
            self._key = text
            self.builds += 1
            log.debug("built the worker's shared model (%d so far)", self.builds)
            return self._model


SHARED = SharedModel()
