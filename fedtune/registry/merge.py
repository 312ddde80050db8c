"""Merging a published adapter into its base: one full model for stacks that do not load adapters.

peft's ``merge_and_unload`` folds the adapter's weights into the base's; the result is an ordinary
transformers model directory (``from_pretrained`` loads it) with the base's tokenizer beside it.
Methods that add computation rather than weights (prompt tuning and its kin, bottleneck adapters)
cannot be merged and are refused before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from fedtune.adapters import ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from fedtune.errors import InvalidInput
from fedtune.hashing import model_dir_hash

MERGE_RECORD = "fedtune-merge.json"


def check_mergeable(adapter_dir: Path) -> None:
    """Refuses an adapter peft cannot fold into the base's weights.

    Raises:
        InvalidInput: naming the method and what to do instead.
    """
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    peft_type = str(config.get("peft_type", "?"))
    # peft's prompt-learning types: virtual tokens, not weights.
    if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "ADAPTION_PROMPT"):
        raise InvalidInput(f"peft cannot merge a {peft_type.lower()} adapter into the base (it adds virtual tokens, "
                           "not weights): serve it with its base instead (PeftModel.from_pretrained or fedtune serve)")


def check_base(base_dir: Path, manifest: dict[str, Any]) -> None:
    """Checks that ``base_dir`` holds the very base the adapter was trained on.

    Raises:
        InvalidInput: its files hash differently from the manifest's ``base_model_hash``.
    """
    want = manifest.get("base_model_hash")
    if not want:
        return
    got = model_dir_hash(base_dir)
    if got != want:
        raise InvalidInput(f"base model {base_dir} is not the one the adapter was trained on (its files hash to "
                           f"{got[:12]}..., the adapter's manifest names {str(want)[:12]}...): "
                           "pass --base with that model")


def untie_if_adapted(base: Any, adapter_dir: Path) -> bool:
    """Gives the output embeddings their own copy of the weight when the base ties them to the input
    embeddings and the adapter changes either: merged in place, the change would reach both, while
    base + adapter changes one. Returns whether it untied them (the merged config then says so).
    """
    from safetensors import safe_open

    if not getattr(base.config, "tie_word_embeddings", False):
        return False
    out_emb, in_emb = base.get_output_embeddings(), base.get_input_embeddings()
    if out_emb is None or in_emb is None or out_emb.weight is not in_emb.weight:
        return False
    with safe_open(str(adapter_dir / SAFETENSORS_WEIGHTS_NAME), framework="pt") as f:
        touched = any(f".{name}." in key for key in f.keys()  # noqa: SIM118 - safe_open has no __iter__
                      for name in _module_names(base, out_emb) | _module_names(base, in_emb))
    if not touched:
        return False
    import torch

    out_emb.weight = torch.nn.Parameter(out_emb.weight.detach().clone())
    base.config.tie_word_embeddings = False
    return True


def _module_names(model: Any, module: Any) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is module}


def merge_adapter(adapter_dir: Path, base_dir: Path, out: Path, manifest: dict[str, Any]) -> Path:
    """Writes base + adapter, merged, as a full model directory at ``out`` (atomically, fp32 on the CPU).

    Raises:
        InvalidInput: the method cannot be merged, the base is not the adapter's, or ``out`` is not empty.
    """
    import torch
    from peft import PeftModel

    from fedtune.models import load_causal_lm, load_tokenizer

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"--out {out} exists and is not empty: choose a new directory")
    check_mergeable(adapter_dir)
    check_base(base_dir, manifest)
    base = load_causal_lm(base_dir, torch.device("cpu"), torch.float32)
    untied = untie_if_adapted(base, adapter_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    try:
        merged = model.merge_and_unload()
    except (ValueError, NotImplementedError, AttributeError) as e:
        method = (manifest.get("peft") or {}).get("method", "this method")
        raise InvalidInput(f"peft cannot merge {method} adapters into the base: {e}") from e
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(base_dir).save_pretrained(tmp)
    record = {"job": manifest.get("job"), "round": manifest.get("round"), "base_model": manifest.get("base_model"),
              "base_model_hash": manifest.get("base_model_hash"), "adapter_files": manifest.get("files"),
              "method": (manifest.get("peft") or {}).get("method"), "untied_embeddings": untied}
    (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
