"""The built-in preference task: short instructions with one verifiable answer.

Each prompt asks to reverse or sort a short list of symbols ("Sort ascending: 7 2 9"). The chosen
response states the correct answer; the rejected one states a *plausible* wrong answer produced by a
systematic mistake (copying instead of reversing, sorting descending instead of ascending).
Every wrong answer is checkable, so the task has ground truth: `check(prompt, response)` scores any
generated text, which is what makes sweeps over α, β, γ meaningful on a laptop.

Knobs (`TaskConfig`): size, difficulty (list length), a length bias (in a fraction |length_bias| of
*training* pairs the rejected response, if positive, or the chosen one, if negative, carries a verbose
preamble that does not change correctness), label noise (a fraction of *training* pairs flipped) and
the seed. Held-out pairs are always clean: no label noise and no length bias, so a method that learned
"shorter is better" (or "longer is better") from biased training pairs is caught on held-out data.
Generation is deterministic for a config, and held-out prompts are disjoint from training prompts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
# List length range for each difficulty level.
LENGTHS = {1: (3, 4), 2: (4, 6), 3: (6, 8)}
PREAMBLE = "Let me work through this carefully, one item at a time. "
OPERATIONS = ("reverse", "sort")


@dataclass(frozen=True)
class TaskConfig:
    """Settings of the built-in task; `key()` is a stable hash used to cache artefacts built from it."""

    train_size: int = 2000
    held_out_size: int = 200
    difficulty: int = 1
    length_bias: float = 0.0
    label_noise: float = 0.0
    operations: tuple[str, ...] = OPERATIONS
    seed: int = 0

    def __post_init__(self):
        if self.difficulty not in LENGTHS:
            raise ValueError(f"task.difficulty must be one of {sorted(LENGTHS)}, got {self.difficulty}")
        if not -1.0 <= self.length_bias <= 1.0:
            raise ValueError(f"task.length_bias must be in [-1, 1], got {self.length_bias}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"task.label_noise must be in [0, 0.5), got {self.label_noise}")
        if self.train_size < 1 or self.held_out_size < 1:
            raise ValueError("task.train_size and task.held_out_size must be >= 1")
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"task.operations must be a non-empty subset of {OPERATIONS}, got {self.operations}")

    def key(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SFTConfig:
    """Size of the task's tiny SFT reference and how long to train it (`alphadpo_ray.training.sft`; ~1-2 min on 2 CPU cores)."""

    vocab_size: int = 512
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.1
    max_length: int = 128
    max_prompt_length: int = 96
    seed: int = 0


@dataclass(frozen=True)
class Problem:
    operation: str
    items: tuple[str, ...]

    @property
    def prompt(self) -> str:
        listed = " ".join(self.items)
        if self.operation == "reverse":
            return f"Reverse the order: {listed}"
        return f"Sort ascending: {listed}"

    @property
    def answer(self) -> tuple[str, ...]:
        return tuple(reversed(self.items)) if self.operation == "reverse" else tuple(sorted(self.items))


def _wrong_answer(problem: Problem) -> tuple[str, ...]:
    """The task's systematic mistake: copying instead of reversing, sorting the wrong way.

    One deterministic mistake per operation keeps the SFT reference genuinely uncertain: trained on
    both kinds, it finds the right and the wrong answer about equally likely on a new prompt.
    """
    if problem.operation == "reverse":
        return problem.items
    return tuple(sorted(problem.items, reverse=True))


def format_response(items: tuple[str, ...], verbose: bool = False) -> str:
    return (PREAMBLE if verbose else "") + "The answer is " + " ".join(items) + "."


_ANSWER = re.compile(r"The answer is ([^.\n]*)\.")


def parse_answer(response: str) -> tuple[str, ...] | None:
    """The items stated in a response, or None if it states no answer."""
    match = _ANSWER.search(response)
    return tuple(match.group(1).split()) if match else None


_PROMPT = re.compile(r"(Reverse the order|Sort ascending): ((?:\S )*\S)")


def check(prompt: str, response: str) -> bool:
    """True iff `response` states the correct answer to the task `prompt` (templated or not)."""
    match = _PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"not a built-in task prompt: {prompt!r}")
    operation = "reverse" if match.group(1).startswith("Reverse") else "sort"
    problem = Problem(operation, tuple(match.group(2).split()))
    return parse_answer(response) == problem.answer


def _sample_problem(rng: random.Random, config: TaskConfig) -> Problem:
    lo, hi = LENGTHS[config.difficulty]
    n = rng.randint(lo, hi)
    operation = rng.choice(list(config.operations))
    alphabet = LETTERS if operation == "reverse" else DIGITS
    items = tuple(rng.sample(alphabet, n))  # distinct items: sort and reverse answers are unique
    return Problem(operation, items)


def generate(config: TaskConfig) -> tuple[list[dict], list[dict]]:
    """(train, held_out) lists of {prompt, chosen, rejected} dicts; prompts are disjoint between them.

    Length bias and label noise apply to the training rows only; held-out rows are always clean."""
    rng = random.Random(config.seed)
    wanted = config.train_size + config.held_out_size
    problems: dict[str, Problem] = {}
    attempts = 0
    while len(problems) < wanted:
        attempts += 1
        if attempts > 50 * wanted:
            raise ValueError(
                f"task: could not draw {wanted} distinct prompts at difficulty {config.difficulty}; "
                "lower train_size/held_out_size or raise difficulty"
            )
        problem = _sample_problem(rng, config)
        problems.setdefault(problem.prompt, problem)
    ordered = list(problems.values())
    rows = []
    for index, problem in enumerate(ordered):
        wrong = _wrong_answer(problem)
        verbose_rejected = verbose_chosen = False
        # One draw per row, held-out rows included, so the random stream (and with it the training
        # rows and their label noise) does not depend on whether held-out rows are biased: they are not.
        biased = rng.random() < abs(config.length_bias)
        if biased and index < config.train_size:
            verbose_rejected, verbose_chosen = config.length_bias > 0, config.length_bias < 0
        rows.append(
            {
                "prompt": problem.prompt,
                "chosen": format_response(problem.answer, verbose_chosen),
                "rejected": format_response(wrong, verbose_rejected),
            }
        )
    train, held_out = rows[: config.train_size], rows[config.train_size :]
    for row in train:
        if rng.random() < config.label_noise:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    return train, held_out


def corpus(config: TaskConfig) -> list[str]:
    """Text the tiny tokenizer is trained on: every prompt and response of the task."""
    train, held_out = generate(config)
    return [text for row in train + held_out for text in (row["prompt"], row["chosen"], row["rejected"])] + [
        PREAMBLE,
        *[f"Reverse the order: {c}" for c in LETTERS],
        *[f"Sort ascending: {d}" for d in DIGITS],
    ]


__all__ = ["TaskConfig", "SFTConfig", "Problem", "generate", "check", "parse_answer", "format_response", "corpus"]
