"""Error feedback: what a lossy codec left out of one round's update is added to the next one.

With a biased codec such as top-k, dropping the small entries every round loses them for good; carrying
them as a residual makes the sum of what was sent track the sum of the true deltas, off by at most the
residual, which stays bounded. The residual lives on the client, in its state dir, so it survives
restarts of the client process.

Use per round::

    corrected = feedback.apply(delta)          # delta + residual
    wire = codec.encode(corrected)
    feedback.update(codec.decode(wire, schema), corrected)   # residual = corrected - sent
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtune.errors import InvalidInput

log = logging.getLogger(__name__)

_FORMAT = "fedtune-error-feedback/1"


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


class ErrorFeedback:
    """The per-tensor residual of a client's compressed updates, persisted as safetensors at ``path``.

    Args:
        path: File holding the residual (e.g. ``STATE_DIR/feedback/JOB_ID.safetensors``: one per job,
            since a residual is meaningless against another job's adapter). Read now if it exists.

    Raises:
        InvalidInput: ``path`` exists but is not a residual written by this class.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._residual: dict[str, torch.Tensor] = {}
        if self.path.exists():
            try:
                data = self.path.read_bytes()
                self._residual = st_load(data)
            except (OSError, SafetensorError) as e:
                raise InvalidInput(f"error feedback state {self.path} is unreadable ({e}); "
                                   "delete it to start without a residual") from e

    @property
    def residual(self) -> dict[str, torch.Tensor]:
        """What has not been sent yet, by tensor name (empty before the first update)."""
        return dict(self._residual)

    def apply(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This round's delta plus the residual, in fp32.

        A residual for other tensor names or shapes (the job's adapter changed) is dropped first.
        """
        if self._residual and _shapes(self._residual) != _shapes(delta):
            log.warning("adapter tensors changed; dropping the error feedback residual in %s", self.path)
            self.reset()
        return {k: v.detach().to(torch.float32) + self._residual.get(k, 0.0) for k, v in delta.items()}

    def update(self, sent_decoded: Mapping[str, torch.Tensor], corrected: Mapping[str, torch.Tensor]) -> None:
        """Stores ``corrected - sent_decoded`` as the residual and writes it atomically.

        Args:
            sent_decoded: The codec's decode of what was sent this round.
            corrected: What `apply` returned this round.

        Raises:
            ValueError: the two have different tensor names or shapes.
        """
        if _shapes(sent_decoded) != _shapes(corrected):
            raise ValueError("sent_decoded and corrected must have the same tensor names and shapes")
        self._residual = {
            k: (corrected[k].to(torch.float32) - sent_decoded[k].to(torch.float32)).contiguous() for k in corrected
        }
        self._write()

    def reset(self) -> None:
        """Forgets the residual, on disk too."""
        self._residual = {}
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        blob = st_save(self._residual, metadata={"format": _FORMAT})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        # A crash leaves either the old residual or the new one, never half of one.
        os.replace(tmp, self.path)
