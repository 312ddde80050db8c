"""A frozen base model held once per node in Ray's object store and mapped read-only by every job.

The driver puts the weights in the object store as numpy arrays; a worker that gets them receives
read-only views of the node's shared memory (no copy), builds the model skeleton without
initialising or touching its own weight memory, and points the parameters at those views. Four
jobs on one base then cost one copy of the weights, not four.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from fedtune.errors import InvalidInput
from fedtune.models import MODEL_BUILD_LOCK, dtype_for

log = logging.getLogger(__name__)


def put_base(ray: Any, base_dir: Path) -> dict[str, Any]:
    """Puts the base's weights in the object store, one fp32 array per tensor (so this process
    never holds more than one tensor of it); returns the object references by tensor name."""
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise InvalidInput(f"{base_dir} has no *.safetensors weights to share (only safetensors bases can be "
                           "shared across jobs)")
    refs: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                refs[name] = ray.put(handle.get_tensor(name).to(torch.float32).numpy())
    return refs


def get_base(ray: Any, refs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The shared arrays (read-only views of this node's object store) by tensor name."""
    return dict(zip(refs, ray.get(list(refs.values())), strict=True))


def build_from_shared(base_dir: Path, arrays: dict[str, np.ndarray], device: torch.device) -> PreTrainedModel:
    """A causal LM whose frozen weights are ``arrays`` (read-only shared memory on CPU).

    On CPU the parameters alias the arrays; on another device they are copied there.

    Raises:
        InvalidInput: the arrays do not cover the model's weights.
    """
    config = AutoConfig.from_pretrained(base_dir)
    # no_init_weights: the skeleton's weight memory is allocated lazily and never written, so it
    # never becomes resident before the shared arrays replace it.
    with MODEL_BUILD_LOCK, no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with warnings.catch_warnings():
        # The views are read-only by design: the base is frozen.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        state = {name: torch.from_numpy(array) for name, array in arrays.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    # A parameter not in the arrays must now alias one of them (tied weights), else it has no value.
    params = dict(model.named_parameters())
    shared = {t.data_ptr() for t in state.values()}
    missing = [k for k in result.missing_keys if k in params and params[k].data_ptr() not in shared]
    if missing:
        raise InvalidInput(f"shared weights of {base_dir} lack {len(missing)} parameters, e.g. {missing[0]}")
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type != "cpu":
        model = model.to(device=device, dtype=dtype_for(device))  # type: ignore[arg-type]
    return model.eval()

