"""Whether an adapter directory is what ``vllm serve --enable-lora --lora-modules NAME=DIR`` loads.

Checked at the file level, against what vLLM's LoRA loader reads (vllm-project/vllm, ``vllm/lora/``):

- ``peft_helper.py`` (``PEFTHelper.from_local_dir`` / ``from_dict`` / ``validate_legal``): reads
  ``adapter_config.json``; ``r``, ``lora_alpha`` and ``target_modules`` are required; ``bias`` must
  be ``none`` unless the server runs with LoRA bias enabled; ``modules_to_save`` must be empty
  ("vLLM only supports modules_to_save being None"); ``use_dora`` must be false; ``r`` must not
  exceed ``--max-lora-rank`` (16 by default). The scale is ``lora_alpha / r`` (``/ sqrt(r)`` with
  ``use_rslora``); fields it has no slot for, such as ``rank_pattern`` and ``alpha_pattern``, are
  dropped, so an adapter that needs them would load with the wrong scale.
- ``lora_model.py`` (``LoRAModel.from_local_checkpoint``): reads ``adapter_model.safetensors``;
  every key goes through ``utils.parse_fine_tuned_lora_name``, and the last part of each module
  name must be one of the base's LoRA-capable (linear) modules.
- ``utils.py`` (``parse_fine_tuned_lora_name``): a key is ``base_model.model.<module>.lora_A.weight``
  or ``.lora_B.weight`` (or ``.lora_embedding_A`` / ``.lora_embedding_B``); anything else is
  "unsupported LoRA weight".
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.adapters import ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

VLLM_DEFAULT_MAX_LORA_RANK = 16
_PREFIX = "base_model.model."


def vllm_lora_module(key: str) -> str | None:
    """The module a tensor key adapts, as vLLM parses it; None when vLLM would refuse the key."""
    if not key.startswith(_PREFIX):
        return None
    parts = key[len(_PREFIX):].split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2])
    if len(parts) >= 2 and parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1])
    return None


def vllm_problems(adapter_dir: Path, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
                  linear_modules: set[str] | None = None) -> list[str]:
    """What would stop vLLM from serving ``adapter_dir`` as a LoRA module (empty: nothing).

    Args:
        adapter_dir: A published or pulled adapter directory.
        max_lora_rank: The server's ``--max-lora-rank``.
        linear_modules: Last name parts of the base's linear layers (``q_proj``...), when known:
            every adapted module must be one of them.
    """
    config_path = adapter_dir / ADAPTER_CONFIG_NAME
    weights_path = adapter_dir / SAFETENSORS_WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        return [f"{adapter_dir} lacks {ADAPTER_CONFIG_NAME} or {SAFETENSORS_WEIGHTS_NAME}"]
    config = json.loads(config_path.read_text())
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}: vLLM serves LoRA adapters only")
    for name in ("r", "lora_alpha", "target_modules"):
        if name not in config:
            problems.append(f"adapter_config.json has no {name!r} (vLLM requires it)")
    r = config.get("r")
    if isinstance(r, int) and r > max_lora_rank:
        problems.append(f"rank {r} is over vLLM's --max-lora-rank {max_lora_rank} (start vllm with a larger one)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("the adapter trains biases: vLLM needs --enable-lora-bias, or bias none")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: vLLM only supports none")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora): vLLM does not support it")
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name):
            problems.append(f"{name} {config[name]}: vLLM ignores it and would scale the adapter wrongly")
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as f:
        keys = list(f.keys())
    if not keys:
        problems.append(f"{SAFETENSORS_WEIGHTS_NAME} holds no tensors")
    for key in keys:
        module = vllm_lora_module(key)
        if module is None:
            problems.append(f"tensor {key!r} is not a LoRA weight vLLM loads (base_model.model.<module>.lora_A.weight)")
        elif linear_modules is not None and module.rsplit(".", 1)[-1] not in linear_modules:
            problems.append(f"tensor {key!r} adapts {module}, which is not a linear layer of the base")
    return problems
