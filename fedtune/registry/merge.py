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

from fedtune.adapters import ADAPTER_CONFIG_NAME
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
              "method": (manifest.get("peft") or {}).get("method")}
    (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
