"""The key/value cache of a running batch whose rows come and go.

Rows of different lengths are left-padded: every row's newest token sits in the last column, the
attention mask hides each row's padding, and each row carries its own position ids. A decode step
writes one column for all rows into spare capacity (no copy of the cache per step, unlike
transformers' `DynamicLayer`, which concatenates). Rows leave with `select`; new rows join with
`concat`, which right-aligns the two caches.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Spare columns allocated beyond what is needed, so that the next steps write in place.
_GROWTH = 64


class _GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that writes into a buffer with spare columns; `keys`/`values` are views of it."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def set(self, keys: torch.Tensor, values: torch.Tensor, spare: int = _GROWTH) -> None:
        """Replaces the contents with `keys`/`values` ([rows, heads, length, head_dim])."""
        rows, heads, length, dim = keys.shape
        self._k = keys.new_zeros(rows, heads, length + spare, dim)
        self._v = values.new_zeros(rows, values.shape[1], length + spare, values.shape[-1])
        self._k[:, :, :length] = keys
        self._v[:, :, :length] = values
        self._len = length
        self.device = keys.device
        self.is_initialized = True
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k is None or self._v is None:
            self.set(key_states, value_states)
            return self.kv()
        new = key_states.shape[-2]
        if self._len + new > self._k.shape[-2]:
            self.set(*self.kv(), spare=new + max(_GROWTH, self._len))
            assert self._k is not None and self._v is not None
        self._k[:, :, self._len:self._len + new] = key_states
        self._v[:, :, self._len:self._len + new] = value_states
        self._len += new
        self._expose()
        return self.kv()

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values in use, [rows, heads, length, head_dim] each."""
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def _expose(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[:, :, :self._len]
        self.values = self._v[:, :, :self._len]

    def get_seq_length(self) -> int:
        return self._len


class RowCache(Cache):
    """A KV cache of left-aligned padded rows for a batch that changes between decode steps.

    Args:
        num_layers: Attention layers of the model.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[_GrowingLayer() for _ in range(num_layers)])

    @property
    def rows(self) -> int:
        """Number of rows."""
        first = self._layer(0)
        return 0 if first._k is None else int(first._k.shape[0])

    @property
    def length(self) -> int:
        """Columns in use (the longest row, padding included)."""
        return self.get_seq_length()

    def _layer(self, i: int) -> _GrowingLayer:
        layer = self.layers[i]
        assert isinstance(layer, _GrowingLayer)
        return layer

    def select(self, rows: torch.Tensor, skip: int = 0) -> None:
        """Keeps only `rows` (indices into the current rows, in that order) and drops the first
        `skip` columns (padding that none of them uses)."""
        for i in range(len(self.layers)):
            keys, values = self._layer(i).kv()
            self._layer(i).set(keys[:, :, skip:].index_select(0, rows), values[:, :, skip:].index_select(0, rows))

    @staticmethod
    def concat(first: RowCache, second: RowCache) -> RowCache:
        """The rows of `first` then those of `second`, right-aligned: shorter rows get zero columns in front.

        The attention masks must be padded the same way (`pad_left`).
        """
        if first.rows == 0:
            return second
        if second.rows == 0:
            return first
        length = max(first.length, second.length)
        out = RowCache(len(first.layers))
        for i in range(len(first.layers)):
            (ka, va), (kb, vb) = first._layer(i).kv(), second._layer(i).kv()
            keys = torch.cat([_pad_columns(ka, length), _pad_columns(kb, length)])
            values = torch.cat([_pad_columns(va, length), _pad_columns(vb, length)])
            out._layer(i).set(keys, values)
        return out


def _pad_columns(t: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - t.shape[-2]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:2], missing, t.shape[-1]), t], dim=-2)


def pad_left(mask: torch.Tensor, length: int) -> torch.Tensor:
    """An attention mask [rows, columns] with zero columns in front up to `length` columns."""
    missing = length - mask.shape[-1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=-1)
