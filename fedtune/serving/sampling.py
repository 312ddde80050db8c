"""What a request asks of generation: sampling settings, choosing the next token, and its text so far.

Every request samples with its own `torch.Generator`, so a seeded request draws the same tokens
whichever other requests share its batch. Text is detokenized incrementally over a short window of
recent tokens (a token can change how the ones before it decode; a multi-byte character can span
tokens), and held back while it could be the start of a stop string, so a stop string is never
partly streamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedtune.errors import InvalidInput

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# What a decoder emits for an incomplete UTF-8 sequence: such text waits for the next token.
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Attributes:
        max_tokens: Most tokens to generate (finish reason "length" when reached).
        temperature: Softmax temperature; 0 is greedy decoding.
        top_p: Nucleus sampling: draw only from the smallest set of tokens whose probability adds
            up to at least this much.
        stop: Generation ends before the first occurrence of any of these; the stop text is not returned.
        seed: Seeds this request's own generator: the same seed and prompt give the same text.

    Raises:
        InvalidInput: A value is out of range.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidInput(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise InvalidInput(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidInput(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        """Whether the next token is always the most likely one."""
        return self.temperature == 0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own generator: seeded when it names a seed, None (fresh entropy) otherwise."""
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def choose_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None]) -> list[int]:
    """Picks each row's next token.

    Args:
        logits: Next-token logits, one row per request, [rows, vocab].
        params: Each row's settings.
        generators: Each row's generator (`make_generator`).

    Returns:
        One token id per row.
    """
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    for i, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        # On the CPU: each request's generator is a CPU generator.
        probs = torch.softmax(logits[i].cpu() / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep a token when the mass before it is under top_p: the most likely one always stays.
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen[i] = int(torch.multinomial(probs, 1, generator=generator).item())
    return chosen


class CompletionText:
    """A completion's token ids and the part of its text not yet handed out.

    Args:
        tokenizer: The base's tokenizer.
        stop: Stop strings.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self.token_ids: list[int] = []
        self._text = ""  # text of token_ids[:self._read]
        # token_ids[self._prefix:self._read] is decoded again with each new token, as context.
        self._prefix = 0
        self._read = 0
        self._sent = 0  # characters of the text handed out so far

    def add(self, token_id: int, final: bool = False) -> tuple[str, bool]:
        """Adds a generated token.

        Args:
            token_id: The token (special tokens add no text).
            final: No token follows: hand out everything that is left.

        Returns:
            The new text to hand out, and whether a stop string ended the completion (the text then
            ends just before it).
        """
        self.token_ids.append(token_id)
        text = self._decode(final)
        cut = min((i for i in (text.find(s, max(0, self._sent - len(s))) for s in self._stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            return self._take(text, cut), True
        if final:
            return self._take(text, len(text)), False
        end = len(text)
        # Hold back a tail that could still grow into a stop string.
        hold = max((n for s in self._stop for n in range(1, min(len(s) - 1, end - self._sent) + 1)
                    if text[end - n:end] == s[:n]), default=0)
        return self._take(text, end - hold), False

    def _decode(self, final: bool) -> str:
        """The completion's text, decoding only the tokens since the last complete piece."""
        decode = self._tokenizer.decode
        before = str(decode(self.token_ids[self._prefix:self._read], skip_special_tokens=True))
        window = str(decode(self.token_ids[self._prefix:], skip_special_tokens=True))
        # An incomplete character (a partial UTF-8 sequence) waits for the tokens that complete it.
        if len(window) > len(before) and (final or not window.endswith(_REPLACEMENT)):
            self._text += window[len(before):]
            self._prefix, self._read = self._read, len(self.token_ids)
        return self._text

    def _take(self, text: str, end: int) -> str:
        if end <= self._sent:
            return ""
        piece = text[self._sent:end]
        self._sent = end
        return piece
