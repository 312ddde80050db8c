"""Examples to token ids and labels: the loss on responses and assistant turns only.

Pairs (and text, alpaca, and multiple-choice questions, whose response is the right option) are
`bos + prompt + response + eos`, the loss on `response + eos`, unless the job sets
`data.pairs_as_chat`: then a pair is one user turn and one assistant turn.
Conversations go through a chat template (`chat_template_for`), rendered turn by turn so that the
boundary of every assistant turn is exact: the prefix up to each assistant turn (with the
generation prompt) and the text of the turn itself, end-of-turn text included, are tokenized as
separate segments. Every client reads the settings from its task, so all render alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.data.examples import IGNORE_INDEX, Chat, Example
from fedtune.data.formats import DataFile
from fedtune.data.packing import pack, refuse_packing
from fedtune.data.schemas import LoadedData, as_data_spec, parse_records
from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    from fedtune.spec import DataSpec

logger = logging.getLogger(__name__)

# fedtune's default chat template: ChatML, `<|im_start|>role\ncontent<|im_end|>\n` per turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Segments = list[tuple[str, bool]]


class TokenizedData(list[dict[str, list[int]]]):
    """Tokenized (and maybe packed) examples, with what happened on the way.

    Attributes:
        examples: Examples kept (with packing, more than the rows of the list).
        truncated: Examples longer than max_seq_len, cut to it.
        dropped: Examples left out: longer than max_seq_len under `too_long: drop`, or with no
            loss token left once cut.
        lengths: Every example's length in tokens before any cut, in input order.
        template: Which chat template rendered conversations ("" when none was needed).
    """

    def __init__(self, items: Iterable[dict[str, list[int]]] = (), *, examples: int = 0, truncated: int = 0,
                 dropped: int = 0, lengths: Sequence[int] = (), template: str = "") -> None:
        super().__init__(items)
        self.examples = examples
        self.truncated = truncated
        self.dropped = dropped
        self.lengths = list(lengths)
        self.template = template


def chat_template_for(tokenizer: Any, choice: str) -> tuple[str, str]:
    """The chat template a job's `data.chat_template` setting picks, and how to describe it.

    Args:
        tokenizer: The base model's tokenizer.
        choice: "auto" (the tokenizer's own, else the default), "tokenizer" (its own), "default"
            (`DEFAULT_CHAT_TEMPLATE`, ChatML), or a Jinja template.

    Raises:
        InvalidInput: "tokenizer" is asked for and the tokenizer has none.
    """
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, Mapping):  # named templates: the one used by default
        own = own.get("default")
    if choice == "auto":
        return (own, "the tokenizer's own") if own else (DEFAULT_CHAT_TEMPLATE, "fedtune's default (ChatML)")
    if choice == "tokenizer":
        if not own:
            base = getattr(tokenizer, "name_or_path", "") or "the base model"
            raise InvalidInput(f"job asks for the tokenizer's chat template but the tokenizer of {base} has none")
        return own, "the tokenizer's own"
    if choice == "default":
        return DEFAULT_CHAT_TEMPLATE, "fedtune's default (ChatML)"
    return choice, "the job's own"


def render_chat(chat: Chat, tokenizer: Any, template: str) -> Segments:
    """Renders a conversation as text segments, each marked with whether the loss covers it.

    The prefix up to each assistant turn is rendered with the generation prompt, then again with
    the turn: the difference is the turn's text, end-of-turn included, and trained on.

    Raises:
        InvalidInput: The template fails on the conversation, or does not render it prefix by
            prefix (it changes earlier text when a turn is added).
    """
    messages = [{"role": role, "content": content} for role, content in chat.messages]
    segments: Segments = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _apply(tokenizer, messages[:i], template, True, chat, i + 1)
        full = _apply(tokenizer, messages[:i + 1], template, False, chat, i + 1)
        if not prompt.startswith(done) or not full.startswith(prompt):
            where = f"{chat.source}: " if chat.source else ""
            raise InvalidInput(f"{where}the chat template does not render the conversation prefix by prefix at "
                               f"turn {i + 1} (it rewrites earlier text when a turn is added), so the assistant's "
                               "tokens cannot be marked exactly; set data.chat_template to default or a template "
                               "of your own")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, trained) for text, trained in segments if text]


def _apply(tokenizer: Any, messages: list[dict[str, str]], template: str, generation: bool, chat: Chat,
           turn: int) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)
    # Jinja raises TemplateError (and templates call raise_exception for conversations they refuse).
    except Exception as e:
        where = f"{chat.source}: " if chat.source else ""
        raise InvalidInput(f"{where}the chat template fails at turn {turn}: {e}") from e
    if not isinstance(text, str):
        raise InvalidInput(f"the chat template rendered {type(text).__name__}, not text")
    return text


def segments_of(item: Example | Chat, tokenizer: Any, spec: DataSpec, template: str) -> Segments:
    """What an example is rendered as, before tokenization: `(text, trained)` segments.

    A conversation without a system turn gets `spec.system_prompt` as one; pairs (not text)
    become a user and an assistant turn under `spec.pairs_as_chat`.
    """
    if isinstance(item, Example):
        if not (spec.pairs_as_chat and item.prompt):
            return [(item.prompt, False), (item.response, True)]
        item = Chat((("user", item.prompt), ("assistant", item.response)))
    if spec.system_prompt is not None and item.messages[0][0] != "system":
        item = Chat((("system", spec.system_prompt), *item.messages), item.source)
    return render_chat(item, tokenizer, template)


def tokenize(examples: Sequence[Example | Chat] | DataFile, tokenizer: Any, max_seq_len: int,
             data: DataSpec | Mapping[str, Any] | None = None, *, packing: bool = False) -> TokenizedData:
    """Turns examples into token ids and labels that train on responses and assistant turns only.

    Pairs are `bos + prompt + response + eos` (bos/eos left out where the tokenizer has none), the
    labels equal to the ids on response and eos and `IGNORE_INDEX` elsewhere; conversations are
    rendered by the chat template (see `render_chat`), the labels on assistant turns. Segments are
    tokenized separately so the boundaries are exact for any tokenizer. An example longer than
    `max_seq_len` is cut to it, or left out under `too_long: drop`; one whose trained part is cut
    away entirely is left out (it would add no loss, and a batch of them has a 0/0 loss).

    Args:
        examples: From `load_data`, or a `DataFile` from `read_data`: then (and for a `load_data`
            result read under other column names) the records are read under `data`'s columns.
        tokenizer: A Hugging Face tokenizer.
        max_seq_len: Longest sequence kept, in tokens.
        data: The job's data settings, a `DataSpec` or its dict (as a task carries it); None: defaults.
        packing: Pack the examples into rows of up to `max_seq_len` tokens (see `pack`).

    Returns:
        One `{"input_ids": [...], "labels": [...]}` per kept example (with packing, per row, with
        `position_ids`), in order; counts of what was cut and left out are attributes.

    Raises:
        InvalidInput: `max_seq_len` is below 2, no example keeps a trained token, a record or the
            chat template is bad, or packing is asked for a model that ignores packed positions.
    """
    if max_seq_len < 2:
        raise InvalidInput(f"max_seq_len must be at least 2, got {max_seq_len}")
    spec = as_data_spec(data)
    if isinstance(examples, DataFile):
        examples = parse_records(examples, spec)
    elif isinstance(examples, LoadedData) and examples.columns != spec.columns():
        examples = parse_records(examples.source, spec)
    if packing:
        refuse_packing(_model_type(tokenizer))
    needs_chat = any(isinstance(e, Chat) or (spec.pairs_as_chat and e.prompt) for e in examples)
    template, described = chat_template_for(tokenizer, spec.chat_template) if needs_chat else ("", "")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out: list[dict[str, list[int]]] = []
    lengths: list[int] = []
    truncated = dropped = 0
    for example in examples:
        input_ids, labels = [], []
        segments = segments_of(example, tokenizer, spec, template)
        is_pair = isinstance(example, Example) and not (spec.pairs_as_chat and example.prompt)
        for n, (text, trained) in enumerate(segments):
            ids = encode(tokenizer, text)
            if is_pair:
                ids = bos + ids if n == 0 else ids + eos
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        lengths.append(len(input_ids))
        cut = len(input_ids) > max_seq_len
        if cut and spec.too_long == "drop":
            dropped += 1
            continue
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        truncated += cut
        out.append({"input_ids": input_ids, "labels": labels})
    if dropped:
        logger.warning("left out %d of %d examples: too long for max_seq_len=%d, or nothing to train on within it",
                       dropped, len(examples), max_seq_len)
    if examples and not out:
        raise InvalidInput(f"no example has a response token within max_seq_len={max_seq_len}")
    rows = pack(out, max_seq_len) if packing else out
    return TokenizedData(rows, examples=len(out), truncated=truncated, dropped=dropped, lengths=lengths,
                         template=described)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text, no special tokens added (bos/eos are placed by `tokenize`)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _model_type(tokenizer: Any) -> str | None:
    # The model's config sits beside its tokenizer in every model directory fedtune loads.
    where = str(getattr(tokenizer, "name_or_path", "") or "")
    if not where:
        return None
    config = Path(where) / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None
