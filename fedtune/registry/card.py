"""Model cards: a ``README.md`` in a published adapter's directory, in the Hugging Face layout.

YAML front matter (``base_model``, ``library_name: peft``, ``tags``) the Hub reads, then the
adapter's method, how many data owners trained it, its metrics round by round, its differential
privacy, and how to load it. ``README.md`` is not one of the files ``fedtune.json`` lists, so
writing it leaves the signature valid: the card is a description, not part of what is signed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from fedtune.registry.lineage import lineage_of, section

CARD_NAME = "README.md"
# Metrics the card's per-round table shows, when rounds have them (eval_* ones join after).
_ROUND_COLUMNS = ("contributors", "examples", "train_loss")
_HIDDEN_EVAL = ("eval_seconds",)


def _hub_base(base_model: str) -> str:
    """The base as the Hub names it: a hub id as is; for a local directory (a preset), its name."""
    return Path(base_model).name if base_model.startswith(("/", ".", "~")) else base_model


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return "" if value is None else str(value)


def _method_line(peft: dict[str, Any]) -> str:
    method = str(peft.get("method", "lora"))
    details = []
    for key in ("r", "alpha", "num_virtual_tokens"):
        if key in peft:
            details.append(f"{key} {peft[key]}")
    targets = peft.get("target_modules")
    if targets:
        details.append("on " + ", ".join(map(str, targets)) if isinstance(targets, list) else f"on {targets}")
    return f"{method} ({'; '.join(details)})" if details else method


def render_card(manifest: dict[str, Any], history: list[dict[str, Any]], *, data_owners: int | None = None,
                signing_key: str | None = None, vllm_ready: bool = False) -> str:
    """The model card of one published round.

    Args:
        manifest: The round's ``fedtune.json``.
        history: The manifests of the job's published rounds up to this one (any order).
        data_owners: Clients enrolled in the job (None: unknown).
        signing_key: The coordinator's manifest-signing key (base64), for the verify command.
        vllm_ready: Whether the directory passes :func:`fedtune.registry.interop.vllm_problems`.
    """
    lin = lineage_of(manifest)
    base = _hub_base(lin.base_model)
    peft = section(manifest, "peft")
    privacy = manifest.get("privacy") if isinstance(manifest.get("privacy"), dict) else None
    tags = ["peft", lin.method, "fedtune", "federated-learning"]
    if privacy:
        tags.append("differential-privacy")
    front = {"base_model": base, "library_name": "peft", "pipeline_tag": "text-generation", "tags": tags}
    name = manifest.get("job_name") or lin.job
    rounds = sorted((lineage_of(m) for m in history if int(m.get("round", 0)) <= lin.round), key=lambda x: x.round)
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {name}: job {lin.job}, round {lin.round}", "",
        f"A {lin.method} adapter for `{lin.base_model}`, tuned with federated learning by fedtune: "
        "each data owner trained it on data that never left their machine, and only adapter updates "
        "travelled, encrypted, to the coordinator that aggregated them.", "",
        "| | |", "|---|---|",
        f"| base model | `{lin.base_model}` (sha256 of its files `{lin.base_model_hash}`) |",
        f"| method | {_method_line(peft)} |",
        f"| data owners | {data_owners if data_owners is not None else 'unknown'} enrolled; "
        f"{lin.contributors} contributed to round {lin.round} |",
        f"| aggregation | {lin.strategy or 'fedavg'} |",
    ]
    if privacy:
        lines.append(f"| differential privacy | epsilon {_fmt(lin.epsilon)} at delta {_fmt(privacy.get('delta'))} "
                     f"(noise multiplier {_fmt(privacy.get('noise_multiplier'))}, clip norm "
                     f"{_fmt(privacy.get('clip_norm'))}, {privacy.get('accountant', 'rdp')}) |")
    else:
        lines.append("| differential privacy | none (updates were not clipped and noised) |")
    lines += [
        f"| job spec sha256 | `{lin.spec_sha256 or 'not recorded'}` |",
        f"| trained from | {_parent(lin.parent_round)} |",
        "",
        "## Metrics per round", "",
    ]
    eval_keys = sorted({k for r in rounds for k in r.metrics if k.startswith("eval_") and k not in _HIDDEN_EVAL})
    columns = [c for c in _ROUND_COLUMNS if any(c in r.metrics for r in rounds)] + eval_keys
    if privacy:
        columns.append("epsilon")
    lines.append("| round | " + " | ".join(c.replace("_", " ") for c in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for r in rounds:
        values = [_fmt(int(r.metrics[c]) if c in ("contributors", "examples") and c in r.metrics else r.metrics.get(c))
                  for c in columns]
        lines.append(f"| {r.round} | " + " | ".join(values) + " |")
    lines += ["", "## How to load", "", "With peft, on the base it was trained on:", "", "```python",
              "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'base = AutoModelForCausalLM.from_pretrained("{lin.base_model}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{lin.base_model}")',
              'model = PeftModel.from_pretrained(base, "path/to/this/directory")',
              "```", ""]
    if vllm_ready:
        lines += ["With vLLM, as one of many LoRA modules over one base:", "", "```bash",
                  f"vllm serve {lin.base_model} --enable-lora "
                  f"--lora-modules {lin.job}-r{lin.round}=path/to/this/directory",
                  "```", ""]
    lines += ["## Provenance", "",
              "`fedtune.json` lists every file of the adapter with its sha256 and is signed with the "
              "coordinator's Ed25519 key; this README is not among the signed files. Check the adapter with:", "",
              "```bash",
              f"fedtune adapters verify path/to/this/directory --public-key {signing_key or 'COORDINATOR_KEY'}",
              "```", ""]
    return "\n".join(lines)


def _parent(parent: int | None) -> str:
    if parent is None:
        return "not recorded"
    return "the job's initial adapter" if parent == 0 else f"round {parent}"


def write_card(adapter_dir: Path, text: str) -> Path:
    """Writes ``README.md`` into ``adapter_dir`` atomically; returns its path."""
    path = adapter_dir / CARD_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (what the Hub reads)."""
    if not text.startswith("---\n"):
        return {}
    block = text[4:].split("\n---\n", 1)[0]
    data = yaml.safe_load(block)
    return data if isinstance(data, dict) else {}
