"""One running batch: the rows that share each forward pass of one model, and their KV cache.

New rows join between decode steps: their prompts are prefilled together (left-padded) and their
cache is right-aligned onto the batch's (`RowCache.concat`). A decode step feeds every row its last
token. Finished rows leave with `keep`. Each row has its own attention mask and position ids, so a
row's tokens are what it would get alone. A prompt-tuning adapter's virtual tokens are embeddings
put before each prompt at prefill, as peft's `generate` puts them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from fedtune.serving.kv_cache import RowCache, pad_left

# Routes rows to adapters for the forward passes inside the block: one name (or None) per row.
Router = Callable[[Sequence[str | None]], AbstractContextManager[Any]]


class RunningBatch:
    """The rows of one model's batch: cache, attention mask, next position and last token of each.

    Args:
        model: A causal LM (a transformers model, possibly with peft layers injected).
        route: Sets per-row adapters for the forward passes inside its block.
        num_layers: The model's attention layers.
        pad_id: Token id put in padding positions (they are masked out).
        prefix: Embeddings put before every prompt, [virtual tokens, hidden] (prompt tuning).
    """

    def __init__(self, model: Any, route: Router, num_layers: int, pad_id: int,
                 prefix: torch.Tensor | None = None) -> None:
        self.model = model
        self.prefix = prefix
        self.virtual_tokens = 0 if prefix is None else int(prefix.shape[0])
        self.route = route
        self._num_layers = num_layers
        self._pad_id = pad_id
        # transformers 5 renamed the cache argument; older 5.x releases know only the old name.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.routes: list[str | None] = []  # each row's adapter, as `route` names it
        self.cache: RowCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 where a row has a token
        self.positions: torch.Tensor | None = None  # [rows], position id of each row's next token
        self.last: list[int] = []  # each row's newest token, fed at the next step

    @property
    def size(self) -> int:
        """Number of rows."""
        return len(self.routes)

    @property
    def device(self) -> torch.device:
        return next(iter(self.model.parameters())).device

    def join(self, prompts: Sequence[Sequence[int]], routes: Sequence[str | None]) -> torch.Tensor:
        """Prefills new rows and appends them to the batch.

        Args:
            prompts: Token ids of each new row's prompt.
            routes: Each new row's adapter.

        Returns:
            Next-token logits of the new rows, [new rows, vocab]; `set_last` must follow.
        """
        device = self.device
        virtual = self.virtual_tokens
        longest = max(len(p) for p in prompts) + virtual
        ids = torch.full((len(prompts), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, longest - len(prompt) - virtual:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs: dict[str, torch.Tensor] = {"input_ids": ids.to(device)}
        if self.prefix is not None:
            embeds = self.model.get_input_embeddings()(ids.to(device))
            for i, prompt in enumerate(prompts):
                start = longest - len(prompt) - virtual
                embeds[i, start:start + virtual] = self.prefix.to(embeds.dtype)
            inputs = {"inputs_embeds": embeds}
        cache = RowCache(self._num_layers)
        with self.route(routes):
            out = self.model(**inputs, attention_mask=mask.to(device), position_ids=positions.to(device),
                             use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        mask = mask.to(device)
        lengths = torch.tensor([len(p) + virtual for p in prompts], device=device)
        if self.cache is None or self.mask is None or self.positions is None:
            self.cache, self.mask, self.positions = cache, mask, lengths
        else:
            width = max(self.mask.shape[1], longest)
            self.cache = RowCache.concat(self.cache, cache)
            self.mask = torch.cat([pad_left(self.mask, width), pad_left(mask, width)])
            self.positions = torch.cat([self.positions, lengths])
        self.routes.extend(routes)
        self.last.extend([0] * len(prompts))
        return out.logits[:, -1]

    def set_last(self, tokens: Sequence[int], first: int = 0) -> None:
        """Records the newest token of rows ``first`` onwards (fed at the next step)."""
        self.last[first:first + len(tokens)] = list(tokens)

    def step(self) -> torch.Tensor:
        """One decode step for every row: feeds each its last token.

        Returns:
            Next-token logits, [rows, vocab]; `set_last` must follow.
        """
        assert self.cache is not None and self.mask is not None and self.positions is not None
        device = self.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        ids = torch.tensor(self.last, dtype=torch.long, device=device)[:, None]
        with self.route(self.routes):
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.positions[:, None],
                             use_cache=True, **{self._cache_arg: self.cache})
        self.positions = self.positions + 1
        return out.logits[:, -1]

    def keep(self, rows: Sequence[int]) -> None:
        """Keeps only these rows (indices, in order), dropping cache columns no row uses any more."""
        if len(rows) == self.size:
            return
        if not rows:
            self.routes, self.last = [], []
            self.cache = self.mask = self.positions = None
            return
        assert self.cache is not None and self.mask is not None and self.positions is not None
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        skip = int(mask.any(0).nonzero()[0].item())
        self.cache.select(index, skip)
        self.mask = mask[:, skip:]
        self.positions = self.positions.index_select(0, index)
        self.routes = [self.routes[i] for i in rows]
        self.last = [self.last[i] for i in rows]
