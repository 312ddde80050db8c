"""QLoRA for client agents: loading a causal LM quantized with bitsandbytes, ready for LoRA training.

The decoder's linear layers are quantized (nf4 with double quantization, or LLM.int8()); the output
head, embeddings and norms stay in floating point, and LoRA trains on top in fp32. Works on CUDA and,
through bitsandbytes' CPU backend, on CPU.

One CPU trap is handled here: on CPUs with AVX512-BF16, a bitsandbytes `Linear4bit` that runs a
forward in eval mode without grad (any `evaluate_loss` pass) repacks its weights, for good, into a
layout only an inference kernel reads. That kernel has no backward, so every later training step
leaves the LoRA gradients None and the optimizer silently skips them; `guard_cpu_linear4bit` turns
the repacking off. `Linear8bitLt` has no such path.
"""

from __future__ import annotations

import logging
from importlib.util import find_spec
from pathlib import Path
from typing import Literal, cast, get_args

import torch
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from fedtune.errors import InvalidInput
from fedtune.models import MODEL_BUILD_LOCK

logger = logging.getLogger(__name__)

Quantization = Literal["nf4", "int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)

# bitsandbytes logs this on every int8 forward whose input is not fp16, i.e. on every layer and step
# on CPU; LLM.int8() always quantizes activations through fp16, so there is nothing to act on.
_INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"
_INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast"


def load_quantized_causal_lm(path: Path, device: torch.device, quantize: str) -> PreTrainedModel:
    """Loads a causal LM with its decoder linear layers quantized by bitsandbytes, for QLoRA.

    nf4 uses double quantization and computes in bf16 on CUDA GPUs that support it, fp16 on older
    ones, and fp32 on CPU (bf16 there is correct but was about twice as slow). int8 is LLM.int8().
    The output embedding (`lm_head`) is not quantized. Non-quantized weights end up in fp32 and
    all weights are frozen (`peft.prepare_model_for_kbit_training`, without gradient checkpointing).
    On CPU the `Linear4bit` layers are guarded against the eval-mode repacking described in
    `guard_cpu_linear4bit`.

    Args:
        path: A model directory (see `fedtune.models.resolve_base`).
        device: "cuda" (any index) or "cpu".
        quantize: "nf4" or "int8".

    Returns:
        The model on `device`, frozen, in eval mode; wrap it with `fedtune.peft_io.build_peft_model`.

    Raises:
        InvalidInput: `quantize` is unknown, bitsandbytes (or accelerate) is not installed, the
            installed bitsandbytes cannot run on `device`, or the directory does not hold a
            loadable causal LM. All but the last are raised before anything is loaded.
    """
    check_quantization_supported(quantize, device)
    _quiet_bitsandbytes_logs()
    dtype = _compute_dtype(device)
    if quantize == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # llm_int8_skip_modules is left unset on purpose: transformers then keeps the output embedding
    # (whatever the architecture names it) and any weight tied to it unquantized. Naming modules
    # here would replace that default, not add to it.
    try:
        with MODEL_BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                quantization_config=config,
                dtype=dtype,
                device_map={"": _placement(device)},
            )
    except (OSError, ValueError, KeyError) as e:
        raise InvalidInput(f"cannot load a causal language model from {path}: {e}") from e
    # Before anything runs a forward: a repacked layer stays repacked.
    guarded = guard_cpu_linear4bit(model)
    # Freezes the base and upcasts fp16/bf16 norms, embeddings and lm_head to fp32 (a no-op on CPU,
    # where they already are): the QLoRA recipe for stable training. Gradient checkpointing stays
    # off: it doubled step time on the tiny preset, and the training loop, not the loader, should
    # choose to trade time for memory.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    logger.info(
        "loaded %s in %s (dtype %s) on %s, %.1f MiB; %d Linear4bit layers guarded",
        path,
        quantize,
        dtype,
        device,
        model.get_memory_footprint() / 2**20,
        guarded,
    )
    return model.eval()


def check_quantization_supported(quantize: str, device: torch.device) -> None:
    """Fails fast when a quantized load cannot work here, naming what to change.

    Args:
        quantize: The requested quantization.
        device: Where the model would go.

    Raises:
        InvalidInput: `quantize` is unknown, bitsandbytes or accelerate is missing, or the
            installed bitsandbytes has no backend for `device`.
    """
    if quantize not in QUANTIZATIONS:
        raise InvalidInput(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if find_spec("bitsandbytes") is None:
        raise InvalidInput(f"{quantize} quantization needs bitsandbytes: install fedtune[quant]")
    # transformers refuses bitsandbytes loading without accelerate, with an ImportError.
    if find_spec("accelerate") is None:
        raise InvalidInput(f"{quantize} quantization needs accelerate: pip install accelerate")
    if device.type not in ("cpu", "cuda"):
        raise InvalidInput(f"quantized loading runs on cpu or cuda devices, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("quantized loading on cuda requested but CUDA is not available")

    import bitsandbytes as bnb
    from bitsandbytes.cextension import lib

    version = getattr(bnb, "__version__", "?")
    # Releases before the multi-backend work run on CUDA only and lack this set.
    if device.type not in getattr(bnb, "supported_torch_devices", {"cuda"}):
        raise InvalidInput(
            f"bitsandbytes {version} cannot quantize on {device.type}; upgrade bitsandbytes or use a CUDA device"
        )
    # On CUDA, bitsandbytes imports fine without a binary for this CUDA (or ROCm) version and
    # fails only at the first kernel call, deep inside loading; its mock library says why.
    if device.type == "cuda" and not getattr(lib, "compiled_with_cuda", False):
        # vars(): the library object answers any other attribute name with a stub function.
        lines = str(vars(lib).get("error_msg", "")).strip().splitlines()
        reason = lines[0] if lines else "no CUDA library was loaded"
        build = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        raise InvalidInput(
            f"bitsandbytes {version} has no working library for this GPU (torch built for {build}): "
            f"{reason}; run `python -m bitsandbytes` for details"
        )


def guard_cpu_linear4bit(model: torch.nn.Module) -> int:
    """Keeps bitsandbytes `Linear4bit` layers on CPU trainable after eval-mode forwards.

    bitsandbytes (0.50) repacks a CPU `Linear4bit`'s weights for an AVX512-BF16 inference kernel the
    first time it runs in eval mode on an input without grad, and never packs them back. That kernel
    has no backward: LoRA gradients then come out None and training silently stops. This turns the
    repacking off (the layers then dequantize for every forward, in training and in eval alike). A
    layer that was already repacked is unpacked with bitsandbytes' own inverse, which returns its
    quantization scales rounded to bf16, so its outputs move slightly (about 1e-3 on the tiny preset).

    Args:
        model: Any module; a peft model works too.

    Returns:
        How many `Linear4bit` layers on CPU were guarded; 0 without bitsandbytes or on CUDA, where
        the repacking never happens.
    """
    if find_spec("bitsandbytes") is None:
        return 0
    import bitsandbytes as bnb

    guarded = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit) or module.weight.device.type != "cpu":
            continue
        module.support_avx512bf16_for_cpu = False
        # nn.Linear types weight as a plain tensor; in a Linear4bit it is always a Params4bit.
        weight = cast("bnb.nn.Params4bit", module.weight)
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            logger.warning("%s was repacked for CPU inference already; unpacking it for training", name)
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        guarded += 1
    return guarded


def _compute_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        # bitsandbytes' CPU backend computes correctly in both fp32 and bf16, but bf16 training
        # steps took about twice as long as fp32 on the tiny preset, even on a CPU with AVX512-BF16.
        return torch.float32
    # Pre-Ampere GPUs lack bf16; fp16 is the only half type they run fast.
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _placement(device: torch.device) -> int | str:
    # device_map pins every module to one device; accelerate wants a GPU index, not a bare "cuda".
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return "cpu"


class _DropInt8CastMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INT8_CAST_MESSAGE)


def _quiet_bitsandbytes_logs() -> None:
    # A logger's filters see only records logged on that very logger, so it goes on the source.
    target = logging.getLogger(_INT8_CAST_LOGGER)
    if not any(isinstance(f, _DropInt8CastMessage) for f in target.filters):
        target.addFilter(_DropInt8CastMessage())
