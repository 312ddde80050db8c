"""Base models: the built-in tiny presets, resolving `--base`, hashing model dirs, loading on a device.

The tiny presets exist so that demos and tests run offline and in seconds: each is an ordinary
Hugging Face model directory (a randomly initialised 2-block model of one family, Llama, Qwen2,
Qwen3, Mistral, Gemma, Gemma 2, Gemma 3, Phi-3, GPT-2 or OPT, plus a character-level tokenizer)
that every participant can rebuild byte for byte, so its content hash identifies it like any hub
model. `tiny-llama` is the default.
"""

from __future__ import annotations

import logging
import os
import shutil
import string
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedtune.errors import InvalidInput

# Held while a model or an adapter is built. transformers replaces torch.nn.init's functions
# process-wide while it constructs a model (no-ops under no_init_weights) and puts back what it
# found: two threads building at once (virtual clients sharing a process) can leave them as no-ops
# for good, and every later init (peft's LoRA A, a test's normal_) then silently does nothing.
# Seeding an adapter's init uses torch's one global RNG, which threads share too.
MODEL_BUILD_LOCK = threading.RLock()

if TYPE_CHECKING:
    # transformers is imported where a model or tokenizer is built: its import takes seconds,
    # and a client agent should refuse a bad token or data file before paying for it.
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

logger = logging.getLogger(__name__)

TINY_PRESET = "tiny-llama"

# Fixed so that every participant builds the same weights; changing it changes the preset's hash.
_PRESET_SEED = 1234
_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
_MAX_POSITIONS = 256
# Files whose presence means a preset directory was written completely.
_PRESET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_preset(name: str) -> bool:
    """Tells whether `name` is a built-in preset.

    Args:
        name: A `--base` value.

    Returns:
        True for a built-in preset name.
    """
    return name in PRESETS


def materialize_preset(name: str, out_dir: Path) -> Path:
    """Builds a built-in preset as an ordinary Hugging Face model directory.

    The build is deterministic: two calls write byte-identical files, so `model_dir_hash` of the
    result is the same on every machine with the same library versions.

    Args:
        name: Preset name, e.g. `TINY_PRESET`.
        out_dir: Directory to write into (created if missing; existing files are overwritten).

    Returns:
        `out_dir`.

    Raises:
        InvalidInput: `name` is not a known preset.
    """
    if name not in PRESETS:
        raise InvalidInput(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _build_preset(name, out_dir)
    return out_dir


def _char_tokenizer() -> PreTrainedTokenizerFast:
    # Imported here: only the preset build needs the low-level tokenizers API.
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if 32 <= ord(c) < 127 or c == "\n"]
    vocab = {tok: i for i, tok in enumerate([*_SPECIAL_TOKENS, *sorted(set(chars), key=ord)])}
    # BPE without merges splits every string into single characters; unknown ones become <unk>.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    # Fuse joins characters back without the spaces the default decoder would put between tokens.
    backend.decoder = decoders.Fuse()
    # Like Llama tokenizers, encoding a text starts it with <s>.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    pad, bos, eos, unk = _SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=_MAX_POSITIONS,
        padding_side="right",
    )


# Every preset: a transformers config class and its arguments, beside the vocabulary and special
# tokens of the character tokenizer. Two blocks of a small width, so that a job runs in seconds on a
# CPU; 2 key/value heads of 4 (grouped-query attention) where the family has them. tiny-llama is
# wider and came first: its bytes are its identity, so its arguments stay as they are.
_DECODER: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2,
                            "max_position_embeddings": _MAX_POSITIONS}
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    TINY_PRESET: ("LlamaConfig", {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 4,
                                  "max_position_embeddings": _MAX_POSITIONS, "tie_word_embeddings": False}),
    "tiny-qwen2": ("Qwen2Config", _DECODER),
    # Qwen3 normalises queries and keys per head.
    "tiny-qwen3": ("Qwen3Config", {**_DECODER, "head_dim": 16}),
    "tiny-mistral": ("MistralConfig", {**_DECODER, "head_dim": 16}),
    # The Gemmas tie the output head to the embeddings and scale embeddings by sqrt(hidden_size);
    # head_dim is set because theirs defaults to 256.
    "tiny-gemma": ("GemmaConfig", {**_DECODER, "head_dim": 16}),
    # Soft-capped logits, a sliding-window block and a full-attention one.
    "tiny-gemma2": ("Gemma2Config", {**_DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32}),
    "tiny-gemma3": ("Gemma3TextConfig", {**_DECODER, "head_dim": 16, "query_pre_attn_scalar": 16,
                                         "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"]}),
    # Fused projections: qkv_proj for attention, gate_up_proj for the MLP.
    "tiny-phi3": ("Phi3Config", _DECODER),
    # Conv1D layers (c_attn, c_proj, c_fc) under transformer.h, tied embeddings.
    "tiny-gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": _MAX_POSITIONS}),
    # Blocks under model.decoder.layers, learned positions, tied embeddings.
    "tiny-opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "word_embed_proj_dim": 64, "max_position_embeddings": _MAX_POSITIONS}),
}


def preset_config(name: str, layers: int | None = None) -> PretrainedConfig:
    """The transformers config of a preset (with the character tokenizer's vocabulary and tokens).

    Args:
        name: A preset name.
        layers: Another number of blocks (a deeper model of the family, e.g. one to drop blocks
            from for an emulator; not the preset itself, whose files and hash it does not change).

    Raises:
        InvalidInput: `name` is not a known preset.
    """
    import transformers

    if name not in PRESETS:
        raise InvalidInput(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    config_class, arguments = PRESETS[name]
    if layers is not None:
        count = "n_layer" if "n_layer" in arguments else "num_hidden_layers"
        # A per-block attention pattern is the family's default one at the new depth.
        arguments = {**{k: v for k, v in arguments.items() if k != "layer_types"}, count: layers}
    tokenizer = _char_tokenizer()
    config: PretrainedConfig = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **arguments)
    return config


def _build_preset(name: str, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = preset_config(name)
    # fork_rng keeps the caller's global RNG state untouched by the fixed preset seed (manual_seed
    # seeds CUDA too, hence its device in the fork). The weights are drawn on CPU either way.
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with MODEL_BUILD_LOCK, torch.random.fork_rng(devices=cuda):
        torch.manual_seed(_PRESET_SEED)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    _char_tokenizer().save_pretrained(out_dir)


def _preset_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _PRESET_FILES)


def _ensure_preset(name: str, cache_dir: Path) -> Path:
    target = cache_dir / "presets" / name
    if _preset_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        logger.warning("rebuilding incomplete preset directory %s", target)
        shutil.rmtree(target)
    # Build beside the target and rename, so a crash or a concurrent client never leaves a
    # half-written preset that a later run would take as complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        materialize_preset(name, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not _preset_complete(target):
                raise
            logger.debug("preset %s was materialized concurrently; using that copy", name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("materialized preset %s at %s", name, target)
    return target


def resolve_base(base: str, cache_dir: Path, revision: str | None = None) -> Path:
    """Turns a `--base` value into a local model directory.

    Args:
        base: A preset name, a local directory, or a Hugging Face hub id.
        cache_dir: Where presets are materialized (under `presets/<name>`).
        revision: A hub id's branch, tag or commit (the hub's default branch when None).

    Returns:
        A directory holding the model and tokenizer files.

    Raises:
        InvalidInput: `base` is none of the three, or the hub download failed.
    """
    if is_preset(base):
        return _ensure_preset(base, cache_dir)
    local = Path(base).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, revision=revision))
    # Broad on purpose: the hub client raises many unrelated types (HTTP, validation, OS, offline).
    except Exception as e:
        raise InvalidInput(
            f"base model {base!r} is neither a preset, a local directory nor a downloadable hub id: {e}"
        ) from e


def pick_device(pref: str) -> torch.device:
    """Chooses the torch device for `--device`.

    Args:
        pref: "auto" (CUDA when available, else CPU), "cuda", "cuda:N" (GPU N) or "cpu".

    Returns:
        The device.

    Raises:
        InvalidInput: CUDA (or GPU N) was asked for but is not there, or `pref` is unknown.
    """
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    kind, _, index = pref.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise InvalidInput(f"--device must be auto, cpu, cuda or cuda:N, got {pref!r}")
    if not torch.cuda.is_available():
        raise InvalidInput(f"--device {pref} requested but CUDA is not available")
    if index and int(index) >= torch.cuda.device_count():
        raise InvalidInput(f"--device {pref}: this machine has {torch.cuda.device_count()} GPU(s), "
                           f"numbered 0 to {torch.cuda.device_count() - 1}")
    return torch.device(pref)


def dtype_for(device: torch.device) -> torch.dtype:
    """fp32 on CPU; on CUDA, bf16 where the GPU supports it and fp16 otherwise."""
    if device.type != "cuda":
        # Half precision on CPU is slow and numerically poor for training; tiny models fit in fp32.
        return torch.float32
    # Pre-Ampere GPUs lack bf16; fp16 is the only half type they run fast.
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_causal_lm(path: Path, device: torch.device, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Loads a causal language model from a local directory onto `device`.

    Args:
        path: A model directory (see `resolve_base`).
        device: Where to put the model.
        dtype: Its weights' type; by default fp32 on CPU and, on CUDA, bf16 where the GPU supports
            it and fp16 otherwise.

    Returns:
        The model, in eval mode.

    Raises:
        InvalidInput: The directory does not hold a loadable causal LM.
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype or dtype_for(device)
    try:
        with MODEL_BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInput(f"cannot load a causal language model from {path}: {e}") from e
    logger.debug("loaded %s as %s on %s", path, dtype, device)
    # transformers types `to` through a decorator that mypy reads wrongly.
    return model.to(device).eval()  # type: ignore[arg-type]


def base_model_type(path: Path) -> str:
    """The ``config.model_type`` of a model directory ("llama", "gpt2", ...): its family.

    Raises:
        InvalidInput: The directory has no readable model config.
    """
    from transformers import AutoConfig

    try:
        return str(AutoConfig.from_pretrained(path).model_type)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInput(f"cannot read a model config from {path}: {e}") from e


def skeleton_causal_lm(path: Path) -> PreTrainedModel:
    """A model with the base's architecture whose weights are neither loaded nor initialised.

    Enough to build a LoRA adapter on (its initial weights depend on shapes and the seed only),
    without holding the base in memory: the skeleton's weight memory is never touched, so it is
    never resident. The weight files are checked to be readable safetensors or torch files.

    Raises:
        InvalidInput: The directory has no loadable config or no weight files.
    """
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        config = AutoConfig.from_pretrained(path)
        with MODEL_BUILD_LOCK, no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInput(f"cannot load a causal language model from {path}: {e}") from e
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights:
        raise InvalidInput(f"cannot load a causal language model from {path}: no weight files")
    for f in weights:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as handle:
                    handle.keys()
            except (SafetensorError, OSError) as e:
                raise InvalidInput(f"cannot load a causal language model from {path}: {f.name}: {e}") from e
    return model.eval()


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """Loads the tokenizer stored with a model, ready for right-padded batches.

    Args:
        path: A model directory (see `resolve_base`).

    Returns:
        The tokenizer, with a pad token (the eos token when it has none) and right padding.

    Raises:
        InvalidInput: No tokenizer can be loaded, or it has neither a pad nor an eos token.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInput(f"cannot load a tokenizer from {path}: {e}") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidInput(f"tokenizer in {path} has neither a pad nor an eos token to pad with")
        # Padded positions are masked out of attention and loss, so any existing token will do;
        # adding a new one would need an embedding row the frozen base does not have.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
