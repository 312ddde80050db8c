"""Synthetic demo data: non-IID prompt/response files that a tiny character-level model learns fast."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from fedtune.data.examples import Example
from fedtune.errors import InvalidInput

# Short character-level tasks: distinct enough that a client's mix is visible in its losses, easy
# enough that a randomly initialised 2-layer model picks them up in tens of steps.
_LETTERS = "abcdefgh"


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 5)))


def _reverse(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(prompt=f"reverse: {w} ->", response=f" {w[::-1]}")


def _upper(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(prompt=f"upper: {w} ->", response=f" {w.upper()}")


def _sort(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(prompt=f"sort: {w} ->", response=f" {''.join(sorted(w))}")


def _copy(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(prompt=f"copy: {w} ->", response=f" {w}")


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return Example(prompt=f"add: {a}+{b} =", response=f" {a + b}")


_TASKS: tuple[Callable[[random.Random], Example], ...] = (_reverse, _upper, _sort, _copy, _add)
# Share of a client's examples drawn from its own task; the rest come from the other tasks.
_MAIN_TASK_SHARE = 0.8


def write_synthetic_federation(
    out_dir: Path,
    n_clients: int,
    examples_per_client: int = 64,
    eval_examples: int = 64,
    seed: int = 0,
) -> tuple[list[Path], Path]:
    """Writes non-IID prompt/response data for demo clients and a held-out eval set.

    Client `i` draws about 80% of its examples from task `i % 5` (reverse, upper, sort, copy, add
    on short strings) and the rest from the other tasks, so clients' data differ as in a real
    federation. The eval set cycles through all tasks evenly. Output depends only on the arguments.

    Args:
        out_dir: Directory to write `client_<i>.jsonl` and `eval.jsonl` into (created if missing).
        n_clients: Number of client files.
        examples_per_client: Lines per client file.
        eval_examples: Lines in the eval file.
        seed: Seed for all draws.

    Returns:
        The client files in client order, and the eval file.

    Raises:
        InvalidInput: A count is not positive.
    """
    for name, value in (
        ("n_clients", n_clients),
        ("examples_per_client", examples_per_client),
        ("eval_examples", eval_examples),
    ):
        if value < 1:
            raise InvalidInput(f"{name} must be at least 1, got {value}")
    out_dir.mkdir(parents=True, exist_ok=True)
    client_paths: list[Path] = []
    for client in range(n_clients):
        # String seeds hash the same in every process, unlike hash() of a tuple.
        rng = random.Random(f"fedtune-synthetic:{seed}:client:{client}")
        main = client % len(_TASKS)
        others = [t for t in range(len(_TASKS)) if t != main]
        examples = []
        for _ in range(examples_per_client):
            task = main if rng.random() < _MAIN_TASK_SHARE else rng.choice(others)
            examples.append(_TASKS[task](rng))
        client_paths.append(_write_jsonl(out_dir / f"client_{client}.jsonl", examples))
    rng = random.Random(f"fedtune-synthetic:{seed}:eval")
    eval_set = [_TASKS[i % len(_TASKS)](rng) for i in range(eval_examples)]
    return client_paths, _write_jsonl(out_dir / "eval.jsonl", eval_set)


def _write_jsonl(path: Path, examples: Sequence[Example]) -> Path:
    lines = [json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in examples]
    path.write_text("".join(lines), encoding="utf-8")
    return path
