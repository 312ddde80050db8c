"""LoRA adapters in and out of models, bytes and directories, in peft's own save format.

Adapter state dicts carry peft's saved key names (`...q_proj.lora_A.weight`, no adapter name; a
whole module peft trains keeps its own parameter names, `...layers.0.mlp.up_proj.weight`), as
`get_peft_model_state_dict` returns them; the same dict is what travels as an update, what the
coordinator averages and what lands in `adapter_model.safetensors`. Bytes are always safetensors,
never pickle, because updates come from other machines.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from fedtune.adapters import ADAPTER_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    # peft (which imports bitsandbytes) costs ~180 MB per process: the coordinator's job engines,
    # which only move tensors and files, never import it.
    from peft import LoraConfig, PeftConfig, PeftModel
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# Key lists in error messages are cut to this many names to stay one readable line.
_MAX_KEYS_SHOWN = 3


def lora_config(r: int, alpha: float, dropout: float, target_modules: list[str],
                layers: list[int] | None = None, layers_pattern: str | None = None, *,
                whole_blocks: bool = False) -> LoraConfig:
    """Makes the LoRA config that every participant of a job must share.

    Args:
        r: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by `alpha / r`).
        dropout: Dropout on the LoRA input, in [0, 1).
        target_modules: Module name suffixes to adapt, e.g. `["q_proj", "v_proj"]`.
        layers: Only these decoder blocks (offsite tuning adapts the first and last blocks only).
        layers_pattern: Name of the block list in module paths ("layers", "h"), with ``layers``.
        whole_blocks: Train every parameter of the ``layers`` blocks instead of adding LoRA to
            them: the blocks become peft's `modules_to_save` and no module gets LoRA, so r,
            alpha, dropout and target_modules have no effect.

    Returns:
        A causal-LM `LoraConfig` without bias training.

    Raises:
        InvalidInput: A value is out of range, `target_modules` is empty, or ``whole_blocks`` is
            asked without ``layers`` and ``layers_pattern``.
    """
    from peft import LoraConfig, TaskType

    if r < 1:
        raise InvalidInput(f"LoRA rank r must be at least 1, got {r}")
    if alpha <= 0:
        raise InvalidInput(f"LoRA alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise InvalidInput(f"LoRA dropout must be in [0, 1), got {dropout}")
    if not target_modules or not all(isinstance(m, str) and m for m in target_modules):
        raise InvalidInput(
            f"LoRA target_modules must be a non-empty list of module names, got {target_modules!r}"
        )
    if whole_blocks:
        if not layers or not layers_pattern:
            raise InvalidInput("tuning whole blocks needs the block indices and the block list's name")
        from peft.utils.constants import DUMMY_TARGET_MODULES

        # peft's marker for "no LoRA target": the config then only carries modules_to_save, which
        # peft trains, saves (under the module's own parameter names) and loads as whole modules.
        return LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=block_names(layers, layers_pattern),
                          task_type=TaskType.CAUSAL_LM)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int in peft, used as any number
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=list(layers) if layers is not None else None,
        layers_pattern=layers_pattern if layers is not None else None,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def block_names(layers: list[int], layers_pattern: str) -> list[str]:
    """peft `modules_to_save` names of whole decoder blocks, e.g. ``["layers.0", "layers.11"]``.

    peft wraps every module whose name ends with one of them, and a name ends with "layers.1"
    only at block 1 ("model.layers.11" ends with "layers.11"), so each picks exactly its block.
    """
    return [f"{layers_pattern}.{i}" for i in sorted(set(layers))]


def build_peft_model(
    base_model: PreTrainedModel,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    seed: int = 0,
    layers: list[int] | None = None,
    layers_pattern: str | None = None,
    whole_blocks: bool = False,
    config: PeftConfig | None = None,
) -> PeftModel:
    """Wraps a base model with a freshly initialised adapter: LoRA from the keyword arguments, any
    registered method from ``config`` (see `fedtune.methods.config_for`), or trainable copies of
    whole blocks.

    The adapter's random init depends only on `seed`, so participants that build with the same
    arguments start from the same adapter. The base model is modified in place (peft injects its
    layers) and its own weights are frozen.

    Args:
        base_model: A causal LM, e.g. from `fedtune.models.load_causal_lm`.
        r: LoRA rank.
        alpha: LoRA alpha.
        dropout: LoRA dropout.
        target_modules: Module name suffixes to adapt.
        seed: Seed for the adapter's initial weights.
        layers: Only these decoder blocks.
        layers_pattern: Name of the block list in module paths, with ``layers``.
        whole_blocks: Train the ``layers`` blocks' own weights instead (see `lora_config`); the
            adapter then starts as a copy of them.
        config: A ready peft config of any method; the LoRA arguments are then ignored.

    Returns:
        The peft model with the adapter named "default" active.

    Raises:
        InvalidInput: The config is invalid or no module matches `target_modules` (or a block).
    """
    from peft import get_peft_model

    if config is None or whole_blocks:
        config = lora_config(r, alpha, dropout, target_modules or ["q_proj", "v_proj"], layers, layers_pattern,
                             whole_blocks=whole_blocks)
    # As users name it in messages: LoRA, LOHA, PROMPT_TUNING ...
    method = str(getattr(config.peft_type, "value", config.peft_type)).replace("LORA", "LoRA")
    # fork_rng: seeding for a reproducible adapter must not reset the caller's global RNG
    # (manual_seed seeds CUDA too, hence its device in the fork).
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    from fedtune.models import MODEL_BUILD_LOCK

    with MODEL_BUILD_LOCK, torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        # peft itself reads a property transformers 5 deprecated; users cannot act on the warning.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # GPT-2's Conv1D layers store weights transposed; peft notices and sets fan_in_fan_out on them.
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False but the target module is `Conv1D`")
        torch.manual_seed(seed)
        try:
            model = get_peft_model(base_model, config)
        # TypeError: peft's answer to a target layer type the method has no adapter for (LoHa on Conv1D).
        except (ValueError, TypeError) as e:
            raise InvalidInput(f"cannot add {method} to the base model: {e}") from e
    if whole_blocks:
        # peft skips a modules_to_save name that matches nothing; a block that is not there is an error here.
        keys = list(_peft_state(model))
        saved = getattr(config, "modules_to_save", None) or []
        missing = [n for n in saved if not any(f".{n}." in k for k in keys)]
        if missing:
            raise InvalidInput(f"cannot tune whole blocks: the base model has no block {_names(missing)}")
    return model


def check_sequence_room(model: PreTrainedModel, virtual_tokens: int, max_seq_len: int) -> None:
    """Checks that a method's virtual tokens and the job's sequences fit the model's positions.

    Raises:
        InvalidInput: naming both lengths and the model's limit.
    """
    limit = getattr(model.config, "max_position_embeddings", None)
    if virtual_tokens and limit is not None and virtual_tokens + max_seq_len > limit:
        raise InvalidInput(f"job spec: peft.num_virtual_tokens ({virtual_tokens}) plus training.max_seq_len "
                           f"({max_seq_len}) is more than the base's {limit} positions")


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Copies the active adapter's weights out of a model.

    Args:
        model: A peft model.

    Returns:
        Tensors keyed as peft saves them, as fp32 CPU copies that later training does not change.
        Only adapter weights are included (LoRA weights, and the weights of whole modules the
        adapter trains), never frozen base weights (not even of an adapted `lm_head`).
    """
    state = _peft_state(model)
    return {
        k: v.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous() for k, v in state.items()
    }


def live_adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as peft saves them, not copied: most share the parameters'
    storage (:func:`adapter_state` returns copies)."""
    return _peft_state(model)


def _peft_state(model: PeftModel) -> dict[str, torch.Tensor]:
    # peft's default ("auto") adds the whole frozen base weight of an adapted lm_head or embedding
    # to the state: vocab x hidden values that every participant already has, which would then be
    # sent, averaged and stored each round.
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Writes adapter weights into a model that already has a matching adapter.

    Args:
        model: A peft model built with the same LoRA config as the state.
        state: Tensors keyed as `adapter_state` returns them (dtype and device are converted).

    Raises:
        InvalidInput: Keys are missing or unexpected, shapes or dtypes are wrong, or a value is not finite.
    """
    expected = _peft_state(model)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing:
        raise InvalidInput(f"adapter state lacks {len(missing)} key(s): {_names(missing)}")
    if unexpected:
        raise InvalidInput(f"adapter state has {len(unexpected)} unexpected key(s): {_names(unexpected)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise InvalidInput(
                f"adapter tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
        if not value.is_floating_point():
            raise InvalidInput(
                f"adapter tensor {key} has dtype {value.dtype}, expected a floating point type"
            )
        if not torch.isfinite(value).all():
            raise InvalidInput(f"adapter tensor {key} holds NaN or infinite values")
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    # peft reports every base weight as missing (they are not in an adapter state), so only
    # unexpected keys tell us something; they mean peft's key mapping disagreed with ours.
    not_taken = list(result.unexpected_keys)  # type: ignore[attr-defined]  # peft annotates a bare namedtuple
    if "prompt_embeddings" in state and model.active_peft_config.is_prompt_learning:
        # peft loads a soft prompt into its encoder's embedding by hand and still reports the key.
        taken: torch.Tensor = model.prompt_encoder[model.active_adapter].embedding.weight  # type: ignore[index,union-attr,assignment]
        if torch.equal(taken.detach().cpu().float(), state["prompt_embeddings"].float()):
            not_taken.remove("prompt_embeddings")
    if not_taken:
        raise InvalidInput(
            f"adapter state has {len(not_taken)} key(s) the model did not take: {_names(not_taken)}"
        )


def _names(keys: Iterable[str]) -> str:
    names = list(keys)
    shown = ", ".join(names[:_MAX_KEYS_SHOWN])
    return shown + (f" (and {len(names) - _MAX_KEYS_SHOWN} more)" if len(names) > _MAX_KEYS_SHOWN else "")


def tensors_to_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serializes tensors as a safetensors blob.

    Args:
        state: Tensors by name; they are made contiguous and moved to CPU first.
        metadata: String pairs stored in the blob's header.

    Returns:
        The blob; the same input always gives the same bytes.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return st_save(tensors, metadata=metadata)


def bytes_to_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Parses a safetensors blob.

    Args:
        data: Bytes from `tensors_to_bytes` (possibly sent by another machine).

    Returns:
        The tensors by name, on CPU.

    Raises:
        InvalidInput: `data` is not a valid safetensors blob.
    """
    try:
        return st_load(data)
    except SafetensorError as e:
        raise InvalidInput(f"update is not a valid safetensors blob: {e}") from e


def adapter_config_text(peft_config: PeftConfig, base_model_name_or_path: str) -> str:
    """The ``adapter_config.json`` that `PeftModel.save_pretrained` would write for this config.

    Computed once where peft is loaded, so processes that only publish need not import it.
    """
    config = copy.deepcopy(peft_config)
    config.base_model_name_or_path = base_model_name_or_path
    # As peft's own save does: a loaded adapter is for inference unless is_trainable is passed.
    config.inference_mode = True
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        return (Path(tmp) / ADAPTER_CONFIG_NAME).read_text()


def write_adapter_files(config_text: str, state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """Writes ``adapter_config.json`` (as given) and ``adapter_model.safetensors`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    st_save_file(tensors, str(out_dir / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG_NAME).write_text(config_text)
    logger.debug("saved adapter with %d tensors to %s", len(tensors), out_dir)
    return out_dir


def save_adapter_dir(
    peft_config: PeftConfig,
    state: dict[str, torch.Tensor],
    out_dir: Path,
    base_model_name_or_path: str,
) -> Path:
    """Writes an adapter directory that `PeftModel.from_pretrained(base, out_dir)` loads as is.

    Produces exactly what `PeftModel.save_pretrained` would: `adapter_config.json` (in inference
    mode, naming the base) and `adapter_model.safetensors`.

    Args:
        peft_config: The LoRA config the state was trained with (not modified).
        state: Tensors keyed as `adapter_state` returns them.
        out_dir: Directory to write into (created if missing).
        base_model_name_or_path: What the config names as base, e.g. a hub id or a preset name.

    Returns:
        `out_dir`.
    """
    return write_adapter_files(adapter_config_text(peft_config, base_model_name_or_path), state, out_dir)
