"""The built-in verifiable task: determinism, disjoint held-out prompts, the checker, and its knobs
(length bias and label noise on training pairs only; held-out pairs are always clean)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from alphadpo_ray.ml import task as task_lib
from alphadpo_ray.ml.task import PREAMBLE, TaskConfig, check, format_response, generate, parse_answer


def small(**kw) -> TaskConfig:
    return TaskConfig(**{"train_size": 300, "held_out_size": 100, **kw})


def prompts(rows):
    return [r["prompt"] for r in rows]


# ---------------------------------------------------------------- determinism, sizes, disjointness


def test_same_config_gives_identical_rows_and_another_seed_differs():
    config = small(seed=3)
    assert generate(config) == generate(TaskConfig(**dataclasses.asdict(config)))
    other_train, other_held = generate(small(seed=4))
    train, held = generate(config)
    assert prompts(train) != prompts(other_train)
    assert prompts(held) != prompts(other_held)


def test_generation_does_not_depend_on_the_interpreter_hash_seed():
    """Artefacts are cached by the config's hash, so a fresh interpreter must generate the same rows."""
    code = (
        "import json; from alphadpo_ray.ml.task import TaskConfig, generate; "
        "print(json.dumps(generate(TaskConfig(train_size=50, held_out_size=20, length_bias=0.5, "
        "label_noise=0.2, operations=('sort', 'reverse'), seed=7))))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    here = generate(TaskConfig(train_size=50, held_out_size=20, length_bias=0.5, label_noise=0.2,
                               operations=("sort", "reverse"), seed=7))
    assert json.loads(out.stdout) == [list(map(dict, part)) for part in here]


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_sizes_are_honoured_and_held_out_prompts_are_disjoint(difficulty):
    config = small(difficulty=difficulty, train_size=257, held_out_size=43)
    train, held = generate(config)
    assert (len(train), len(held)) == (257, 43)
    assert len(set(prompts(train))) == 257 and len(set(prompts(held))) == 43  # no duplicates either
    assert not set(prompts(train)) & set(prompts(held))
    lo, hi = task_lib.LENGTHS[difficulty]
    for row in train + held:
        items = row["prompt"].split(": ", 1)[1].split()
        assert lo <= len(items) <= hi
        assert len(set(items)) == len(items)


def test_operations_knob_restricts_the_prompts():
    train, held = generate(small(operations=("sort",)))
    assert all(p.startswith("Sort ascending: ") for p in prompts(train + held))
    train, held = generate(small(operations=("reverse",)))
    assert all(p.startswith("Reverse the order: ") for p in prompts(train + held))


def test_too_many_prompts_for_the_difficulty_raises():
    # sort at difficulty 1: 3 or 4 distinct digits -> 10*9*8 + 10*9*8*7 = 5760 distinct prompts
    with pytest.raises(ValueError, match="could not draw 5761 distinct prompts"):
        generate(TaskConfig(train_size=5760, held_out_size=1, operations=("sort",)))


# ---------------------------------------------------------------- the checker


@pytest.mark.parametrize("difficulty", [1, 3])
def test_checker_accepts_every_chosen_and_rejects_every_rejected(difficulty, tiny_tokenizer):
    train, held = generate(small(difficulty=difficulty))
    for row in train + held:
        assert check(row["prompt"], row["chosen"]), row
        assert not check(row["prompt"], row["rejected"]), row
        # the rendered chat-template prompt (what the model and the generation metric see) works too
        rendered = tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        assert rendered != row["prompt"] and row["prompt"] in rendered
        assert check(rendered, row["chosen"])
        assert not check(rendered, row["rejected"])
        # ... and so does the eos-terminated decoded response
        assert check(rendered, row["chosen"] + tiny_tokenizer.eos_token)


def test_checker_on_the_prompts_the_data_pipeline_renders(tiny_tokenizer):
    from alphadpo_ray.ml.data import preference_data_from_rows

    train, _ = generate(small(train_size=40, held_out_size=5))
    dataset, report = preference_data_from_rows(train, chat_template=True, tokenizer=tiny_tokenizer)
    assert report.kept == 40
    for row, original in zip(dataset, train):
        assert row["prompt"].startswith("<|user|>\n") and row["prompt"].endswith("<|assistant|>\n")
        assert check(row["prompt"], row["chosen"]) and not check(row["prompt"], row["rejected"])
        assert check(row["prompt"], format_response(parse_answer(original["chosen"])))


def test_systematic_mistakes_are_the_documented_ones():
    assert check("Reverse the order: a b c", "The answer is c b a.")
    assert not check("Reverse the order: a b c", "The answer is a b c.")  # copied instead of reversed
    assert check("Sort ascending: 7 2 9", "The answer is 2 7 9.")
    assert not check("Sort ascending: 7 2 9", "The answer is 9 7 2.")  # sorted the wrong way
    train, held = generate(small())
    for row in train + held:
        items = tuple(row["prompt"].split(": ", 1)[1].split())
        wrong = items if row["prompt"].startswith("Reverse") else tuple(sorted(items, reverse=True))
        assert parse_answer(row["rejected"]) == wrong


def test_preamble_does_not_change_correctness():
    verbose = format_response(("2", "7", "9"), verbose=True)
    assert verbose.startswith(PREAMBLE)
    assert check("Sort ascending: 9 2 7", verbose)
    assert not check("Sort ascending: 9 2 7", format_response(("9", "7", "2"), verbose=True))


@pytest.mark.parametrize(
    "response, expected",
    [
        ("", None),
        ("I do not know.", None),
        ("the answer is 2 7 9.", None),  # case-sensitive: the task's format
        ("The answer is 2 7 9", None),  # no closing period
        ("The answer is .", ()),
        ("The answer is 2 7 9.", ("2", "7", "9")),
        ("Let me think. The answer is  2   7 9. Then more text", ("2", "7", "9")),
        ("The answer is 1 2.\nThe answer is 3 4.", ("1", "2")),  # the first stated answer counts
        ("The answer is banana.", ("banana",)),
    ],
)
def test_parse_answer_edge_cases(response, expected):
    assert parse_answer(response) == expected


@pytest.mark.parametrize(
    "response",
    ["", "no answer here", "The answer is .", "The answer is banana.", "The answer is 2 7.", "The answer is 2 7 9 9.",
     "The answer is 2 7 9", "\x00\ufffd garbage \U0001f600"],
)
def test_garbage_responses_are_wrong(response):
    assert check("Sort ascending: 7 2 9", response) is False


def test_check_rejects_a_prompt_that_is_not_from_the_task():
    with pytest.raises(ValueError, match="not a built-in task prompt"):
        check("What is the capital of France?", "The answer is Paris.")


# ---------------------------------------------------------------- knobs: label noise and length bias


def test_label_noise_flips_about_the_requested_fraction_of_training_pairs_only():
    config = TaskConfig(train_size=2000, held_out_size=400, label_noise=0.2, seed=1)
    train, held = generate(config)
    flipped = sum(not check(r["prompt"], r["chosen"]) for r in train)
    # Binomial(2000, 0.2): sd = sqrt(2000 * 0.2 * 0.8) ≈ 18 pairs; ±80 is > 4 sd.
    assert abs(flipped - 400) < 80
    for row in train:  # a flipped pair is exactly the clean pair swapped
        assert check(row["prompt"], row["chosen"]) != check(row["prompt"], row["rejected"])
    assert all(check(r["prompt"], r["chosen"]) and not check(r["prompt"], r["rejected"]) for r in held)
    # the noise only swaps labels: the same prompts and the same response pairs as without noise
    clean_train, clean_held = generate(dataclasses.replace(config, label_noise=0.0))
    assert clean_held == held
    assert [(r["prompt"], {r["chosen"], r["rejected"]}) for r in train] == [
        (r["prompt"], {r["chosen"], r["rejected"]}) for r in clean_train
    ]


def _verbose(rows, side):
    return sum(r[side].startswith(PREAMBLE) for r in rows)


@pytest.mark.parametrize("bias", [0.3, 1.0, -0.6])
def test_length_bias_on_training_pairs_only(bias):
    train, held = generate(TaskConfig(train_size=1500, held_out_size=300, length_bias=bias, seed=2))
    longer, shorter = ("rejected", "chosen") if bias > 0 else ("chosen", "rejected")
    biased = _verbose(train, longer)
    # Binomial(1500, |bias|): sd <= sqrt(1500 / 4) ≈ 19.4 pairs; ±90 is > 4 sd.
    assert abs(biased - abs(bias) * 1500) < 90
    assert _verbose(train, shorter) == 0
    for row in train:
        assert (len(row[longer]) > len(row[shorter])) == row[longer].startswith(PREAMBLE)
        assert len(row[longer]) >= len(row[shorter])
    # held-out pairs are clean: no preamble anywhere, chosen and rejected the same length
    assert _verbose(held, "chosen") == _verbose(held, "rejected") == 0
    assert all(len(r["chosen"]) == len(r["rejected"]) for r in held)
    assert all(check(r["prompt"], r["chosen"]) for r in held)


def test_length_bias_changes_neither_prompts_nor_held_out_rows():
    """The bias only adds the preamble: prompts, answers and the held-out set stay those of the unbiased task."""
    base = TaskConfig(train_size=400, held_out_size=100, seed=5, label_noise=0.1)
    train0, held0 = generate(base)
    train1, held1 = generate(dataclasses.replace(base, length_bias=0.7))
    assert held1 == held0
    strip = lambda s: s.removeprefix(PREAMBLE)  # noqa: E731
    assert [(r["prompt"], strip(r["chosen"]), strip(r["rejected"])) for r in train1] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in train0
    ]


def test_no_bias_means_equal_lengths():
    train, held = generate(small())
    assert all(len(r["chosen"]) == len(r["rejected"]) for r in train + held)
    assert _verbose(train + held, "chosen") == _verbose(train + held, "rejected") == 0


# ---------------------------------------------------------------- validation and the cache key


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"difficulty": 0}, "task.difficulty"),
        ({"difficulty": 4}, "task.difficulty"),
        ({"length_bias": 1.5}, "task.length_bias"),
        ({"length_bias": -1.01}, "task.length_bias"),
        ({"label_noise": 0.5}, "task.label_noise"),
        ({"label_noise": -0.1}, "task.label_noise"),
        ({"train_size": 0}, "task.train_size"),
        ({"held_out_size": 0}, "task.held_out_size"),
        ({"operations": ()}, "task.operations"),
        ({"operations": ("sort", "add")}, "task.operations"),
    ],
)
def test_invalid_knobs_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        TaskConfig(**kwargs)


def test_boundary_values_are_accepted():
    TaskConfig(length_bias=1.0)
    TaskConfig(length_bias=-1.0)
    TaskConfig(label_noise=0.0)
    TaskConfig(label_noise=0.49)
    TaskConfig(train_size=1, held_out_size=1, difficulty=3)


# a different valid value for every field
CHANGED = {
    "train_size": 2001,
    "held_out_size": 201,
    "difficulty": 2,
    "length_bias": 0.1,
    "label_noise": 0.1,
    "operations": ("sort",),
    "seed": 1,
}


def test_key_is_stable_and_changes_with_every_field():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(TaskConfig)}, "add the new field to CHANGED"
    base = TaskConfig()
    assert base.key() == TaskConfig().key() == TaskConfig(**dataclasses.asdict(base)).key()
    assert len(base.key()) == 16 and int(base.key(), 16) >= 0
    keys = {base.key()}
    for name, value in CHANGED.items():
        changed = dataclasses.replace(base, **{name: value})
        assert changed.key() != base.key(), name
        keys.add(changed.key())
    assert len(keys) == len(CHANGED) + 1
    assert TaskConfig(length_bias=0.1).key() != TaskConfig(length_bias=-0.1).key()


def test_key_is_stable_across_interpreters():
    code = "from alphadpo_ray.ml.task import TaskConfig; print(TaskConfig(seed=3, length_bias=0.2).key())"
    env = {**os.environ, "PYTHONHASHSEED": "999"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == TaskConfig(seed=3, length_bias=0.2).key()


def test_corpus_covers_every_prompt_and_response():
    config = small(train_size=30, held_out_size=10, length_bias=0.5)
    train, held = generate(config)
    texts = set(task_lib.corpus(config))
    for row in train + held:
        assert {row["prompt"], row["chosen"], row["rejected"]} <= texts
    assert PREAMBLE in texts
