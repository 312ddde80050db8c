"""Client training data: reading any of several formats and schemas, rendering, tokenizing, batching.

- `formats`: JSONL, JSON, CSV, parquet, or a directory saved by `datasets` (`read_records`).
- `schemas`: pairs, text, alpaca, chat, ShareGPT and multiple-choice records, validated (`load_data`,
  `read_data`).
- `render`: chat templates and prompt-masked tokenization (`tokenize`).
- `packing`: padded or packed batches (`collate`, `pack`).
- `check`: `fedtune data check` (`check_data`).
- `synthetic`: non-IID demo data (`write_synthetic_federation`).

Importing this package loads neither torch nor transformers nor datasets; the functions that need
them import them when called.
"""

from fedtune.data.check import DataReport, check_data
from fedtune.data.examples import IGNORE_INDEX, ROLES, Chat, Choice, Example
from fedtune.data.formats import FORMATS, DataFile, detect_format, read_records
from fedtune.data.packing import PACKING_REFUSED, check_packing, collate, pack
from fedtune.data.render import DEFAULT_CHAT_TEMPLATE, TokenizedData, chat_template_for, render_chat, tokenize
from fedtune.data.schemas import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    SCHEMAS,
    LoadedData,
    alpaca_prompt,
    load_data,
    load_jsonl,
    parse_records,
    read_data,
)
from fedtune.data.synthetic import write_synthetic_federation

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "DEFAULT_CHAT_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "PACKING_REFUSED",
    "ROLES",
    "SCHEMAS",
    "Chat",
    "Choice",
    "DataFile",
    "DataReport",
    "Example",
    "LoadedData",
    "TokenizedData",
    "alpaca_prompt",
    "chat_template_for",
    "check_data",
    "check_packing",
    "collate",
    "detect_format",
    "load_data",
    "load_jsonl",
    "pack",
    "parse_records",
    "read_data",
    "read_records",
    "render_chat",
    "tokenize",
    "write_synthetic_federation",
]
