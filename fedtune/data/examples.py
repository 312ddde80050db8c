"""What a data file holds once read: prompt/response pairs, conversations and multiple-choice questions."""

from __future__ import annotations

from dataclasses import dataclass, field

# Label value that torch's cross entropy (and Hugging Face causal LM losses) skip.
IGNORE_INDEX = -100

# Roles of a conversation turn, as chat templates name them.
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One training example; the loss covers `response` only.

    A `{"text": ...}` record becomes an example with an empty prompt, so every token counts.
    Alpaca records become one too, their prompt written in the Stanford Alpaca format
    (see `fedtune.data.schemas.alpaca_prompt`).
    """

    prompt: str
    response: str


@dataclass(frozen=True)
class Chat:
    """One conversation; the loss covers the assistant turns (and each one's end-of-turn text).

    Attributes:
        messages: `(role, content)` pairs: an optional system turn, then user and assistant turns
            alternating, the last one the assistant's.
        source: Where it was read (`file:line`, `file: row N`), for messages; not part of equality.
    """

    messages: tuple[tuple[str, str], ...]
    source: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class Choice(Example):
    """One multiple-choice question: a prompt, its options, and which one is right.

    A pair whose response is the right option, so training and the loss read it as one
    (`response == choices[answer]`); `fedtune.metrics` also scores every option against the others.

    Attributes:
        choices: The options, at least two, none empty, no two alike.
        answer: Index of the right option in `choices`.
        source: Where it was read (`file:line`, `file: row N`), for messages; not part of equality.
    """

    choices: tuple[str, ...] = ()
    answer: int = 0
    source: str = field(default="", compare=False, repr=False)

    @classmethod
    def of(cls, prompt: str, choices: tuple[str, ...], answer: int, source: str = "") -> Choice:
        """A question whose response is its right option."""
        return cls(prompt=prompt, response=choices[answer], choices=choices, answer=answer, source=source)
