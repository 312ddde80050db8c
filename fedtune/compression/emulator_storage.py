"""Writing and loading emulator directories, with the middle blocks optionally quantized.

Quantized weights are stored by transformers' own bitsandbytes integration: the emulator is
re-loaded with a `BitsAndBytesConfig` that skips every linear layer outside the kept middle blocks
(`llm_int8_skip_modules` lists them by full name, lm_head included) and saved again. int8 is
LLM.int8() (int8 weights with one absmax scale per output row, `weight` + `SCB`); nf4 is 4-bit
NormalFloat in blocks of 64 with double-quantized absmax scales. `config.json` then carries the
`quantization_config`, so plain `AutoModelForCausalLM.from_pretrained(dir)` (with bitsandbytes and
accelerate installed) loads the middle as bitsandbytes layers and the adapter blocks as ordinary
`nn.Linear`, which peft LoRA targets as usual. Pruned zeros stay zero: int8 absmax rounds 0 to 0
and NF4 has an exact zero code.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fedtune.compression.blocks import find_blocks
from fedtune.compression.emulator_manifest import read_emulator_manifest
from fedtune.errors import InvalidInput
from fedtune.models import MODEL_BUILD_LOCK, load_causal_lm
from fedtune.quantization import check_quantization_supported, guard_cpu_linear4bit

# Top-level files of a model directory that are weights or model config; everything else
# (tokenizer files, chat templates, README) is copied into the emulator unchanged.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_MODEL_FILES = ("config.json", "generation_config.json", "emulator.json")
_INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"
_INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast"


def quantization_config(quantize: str, skip: list[str]) -> BitsAndBytesConfig:
    """The bitsandbytes settings of a quantized emulator middle.

    Args:
        quantize: "int8" or "nf4".
        skip: Full names of the linear layers to leave in floating point.

    Returns:
        The config transformers stores in config.json.
    """
    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def unquantized_linear_names(model: nn.Module, blocks_path: str, middle: range) -> list[str]:
    """Full names of the linear layers outside the blocks `middle` of the block list."""
    inside = tuple(f"{blocks_path}.{i}." for i in middle)
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and not name.startswith(inside)]


def save_quantized(fp_dir: Path, out_dir: Path, quantize: str, skip: list[str], dtype: torch.dtype) -> None:
    """Re-loads a floating-point emulator with its middle quantized and saves that.

    Args:
        fp_dir: The emulator saved in floating point.
        out_dir: Where to save the quantized emulator.
        quantize: "int8" or "nf4".
        skip: Full names of the linear layers to leave unquantized.
        dtype: Dtype of the unquantized weights.
    """
    with MODEL_BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(
            fp_dir, quantization_config=quantization_config(quantize, skip), dtype=dtype, device_map={"": "cpu"}
        )
    model.save_pretrained(out_dir)


def copy_tokenizer_files(base_dir: Path, out_dir: Path) -> None:
    """Copies every top-level file of `base_dir` that is not weights or model config."""
    for path in sorted(base_dir.iterdir()):
        if (path.is_file() and not path.name.startswith(".") and path.name not in _MODEL_FILES
                and not path.name.endswith(_WEIGHT_SUFFIXES) and not path.name.endswith(".index.json")):
            shutil.copyfile(path, out_dir / path.name)


def load_emulator(path: Path, device: torch.device) -> PreTrainedModel:
    """Loads an emulator for tuning its adapter blocks.

    The adapter blocks and everything outside the block list are ordinary floating-point modules
    (fp32 on CPU, bf16 or fp16 on CUDA). A quantized middle comes back as bitsandbytes layers; on
    CPU their `Linear4bit` layers are guarded so gradients keep flowing through them to the bottom
    adapter blocks after eval-mode passes (`fedtune.quantization.guard_cpu_linear4bit`).

    Args:
        path: A directory written by `fedtune.compression.emulator.build_emulator`.
        device: Where to put it.

    Returns:
        The model in eval mode; nothing is frozen (wrap it with peft).

    Raises:
        InvalidInput: Not an emulator directory, it does not load, its block count disagrees with
            its manifest, or its quantization cannot run on `device`.
    """
    manifest = read_emulator_manifest(path)
    if manifest.quantize is None:
        model = load_causal_lm(path, device)
    else:
        check_quantization_supported(manifest.quantize, device)
        _quiet_int8_cast_logs()
        dtype = torch.float32
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        placement: int | str = "cpu"
        if device.type == "cuda":
            placement = device.index if device.index is not None else torch.cuda.current_device()
        try:
            with MODEL_BUILD_LOCK:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": placement})
        except (OSError, ValueError, KeyError) as e:
            raise InvalidInput(f"cannot load the emulator at {path}: {e}") from e
        guard_cpu_linear4bit(model)
        model.eval()
    found = find_blocks(model)
    if len(found) != manifest.n_layers:
        raise InvalidInput(f"emulator at {path} has {len(found)} blocks, its manifest says {manifest.n_layers}")
    return model


class _DropInt8CastMessage(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INT8_CAST_MESSAGE)


def _quiet_int8_cast_logs() -> None:
    # bitsandbytes logs this on every int8 forward of a non-fp16 input (every layer and step on
    # CPU); LLM.int8() always quantizes activations through fp16, so there is nothing to act on.
    # Filters apply only on the logger a record is logged on, hence on the source logger.
    target = logging.getLogger(_INT8_CAST_LOGGER)
    if not any(isinstance(f, _DropInt8CastMessage) for f in target.filters):
        target.addFilter(_DropInt8CastMessage())
