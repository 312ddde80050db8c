"""One loaded model per simulation worker process, handed from one virtual client to the next.

A worker runs virtual clients one after another (:mod:`fedtune.simulation.pool`). Each is a fresh
agent with its own identity, data and state dir, but they all train the same job on the same base,
so the peft model one of them built is what the next would build: the process keeps it. Handing it
on is exact: every use starts by writing the whole adapter state the client starts from
(:func:`fedtune.peft_io.load_adapter_state` refuses a partial one), the base is frozen, and the
optimizer is made per round. Uses are serialized with :attr:`SharedModel.lock`: two virtual
clients of one process never train the one model at once.

The process also keeps what each virtual client it ran had prepared (its tokenized data, by
:class:`PreparedCache`), as a real agent that stays up keeps it from round to round: a client that
comes back to the same worker skips loading the tokenizer and tokenizing its data again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
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


# Tokens of prepared data one worker process keeps (least recently used ones go first): a bound on
# what it holds for however many virtual clients it runs.
PREPARED_TOKENS = int(os.environ.get("FEDTUNE_SIM_PREPARED_TOKENS", "1000000"))


class PreparedCache:
    """What virtual clients had prepared for their task, by state dir, within a token budget."""

    def __init__(self, max_tokens: int = PREPARED_TOKENS) -> None:
        self.max_tokens = max_tokens
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, state_dir: str, base_hash: str) -> Any:
        """The ``Prepared`` the client of ``state_dir`` left for ``base_hash``, or None."""
        with self._lock:
            item = self._items.get(state_dir)
            if item is None or item[0].base_hash != base_hash:
                return None
            self._items.move_to_end(state_dir)
            self.hits += 1
            return item[0]

    def put(self, state_dir: str, prepared: Any) -> None:
        """Keeps ``prepared`` for the client of ``state_dir``; drops the least recently used over budget."""
        tokens = sum(len(row["input_ids"]) for row in prepared.tokenized)
        with self._lock:
            old = self._items.pop(state_dir, None)
            if old is not None:
                self._tokens -= old[1]
            if tokens > self.max_tokens:
                return
            self._items[state_dir] = (prepared, tokens)
            self._tokens += tokens
            while self._tokens > self.max_tokens:
                _, (_, dropped) = self._items.popitem(last=False)
                self._tokens -= dropped

    def __len__(self) -> int:
        return len(self._items)


SHARED = SharedModel()
PREPARED = PreparedCache()
