"""The data pipeline: loading each shape and file type, row validation, tokenisation with truncation,
collation, the prompt-disjoint held-out split, and the real HH-RLHF harmless-base test file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest
import torch

from alphadpo_ray.ml.data import (
    REASONS,
    check_lengths,
    collate_pairs,
    collate_sft,
    load_preference_data,
    load_with_held_out,
    preference_data_from_rows,
    split_held_out,
    tokenize_pairs,
    tokenize_sft,
    truncate,
)
from alphadpo_ray.errors import ConfigError, DataError

HH_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"

STRING_ROWS = [
    {"prompt": "What is 12 + 34?", "chosen": "46", "rejected": "47"},
    {"prompt": "Reverse 'hello'.", "chosen": "olleh", "rejected": "hello"},
    {"prompt": "Sort d b a c.", "chosen": "a b c d", "rejected": "d c b a"},
]


def write(path: Path, rows: list) -> Path:
    """Write rows as .jsonl / .jsonl.gz / .json (an array) / .parquet, by suffix."""
    name = path.name
    if name.endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    return path


def hh(*turns: str) -> str:
    """A HH conversation from alternating human / assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def msgs(*turns: str, system: str | None = None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# ---------------------------------------------------------------- loading each shape


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz", ".parquet"])
def test_strings_from_each_file_type(tmp_path, suffix):
    ds, report = load_preference_data(write(tmp_path / f"pairs{suffix}", STRING_ROWS))
    assert report.format == "strings" and (report.total, report.kept, report.skipped) == (3, 3, {})
    assert ds.column_names == ["prompt", "chosen", "rejected", "row"]
    assert ds.to_list()[1] == {**STRING_ROWS[1], "row": 1}


def test_hh_split_at_last_assistant_turn(tmp_path):
    rows = [
        {"chosen": hh("Hi", "Hello!", "How do I bake bread?", "  Mix flour and water."),
         "rejected": hh("Hi", "Hello!", "How do I bake bread?", "No.")},
        {"chosen": hh("Q", "A"), "rejected": hh("Q", "B")},
    ]
    ds, report = load_preference_data(write(tmp_path / "hh.jsonl", rows))
    assert report.format == "hh" and report.kept == 2
    first = ds[0]
    assert first["prompt"] == hh("Hi", "Hello!", "How do I bake bread?") + "\n\nAssistant:"
    assert (first["chosen"], first["rejected"]) == ("Mix flour and water.", "No.")
    assert first["prompt"] + " " + first["rejected"] == rows[0]["rejected"]


def test_messages_rendered_with_chat_template(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "ignored", "chosen": msgs("What is 2+2?", "4"), "rejected": msgs("What is 2+2?", "5")},
        {"chosen": msgs("Hi", "Hello", "Name a colour.", "Blue", system="Be brief."),
         "rejected": msgs("Hi", "Hello", "Name a colour.", "Seven", system="Be brief.")},
    ]
    path = write(tmp_path / "uf.jsonl", rows)
    ds, report = load_preference_data(path, tokenizer=tiny_tokenizer)
    assert report.format == "messages" and report.kept == 2
    assert ds[0]["prompt"] == "<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    assert (ds[0]["chosen"], ds[0]["rejected"]) == ("4</s>", "5</s>")
    assert ds[1]["prompt"] == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello</s>"
                               "<|user|>\nName a colour.\n<|assistant|>\n")
    assert ds[1]["chosen"] == "Blue</s>"
    with pytest.raises(ConfigError, match="chat_template"):
        load_preference_data(path)  # messages need a tokenizer


class PrefixlessTemplate:
    """A tokenizer whose full rendering does not start with the generation-prompt rendering."""

    chat_template, eos_token = "x", "<eos>"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        body = "|".join(f"{m['role']}:{m['content']}" for m in messages)
        return f"[{body}]>" if add_generation_prompt else f"[[{body}]]"


def test_messages_fallback_when_prompt_not_a_prefix():
    ds, _ = preference_data_from_rows([{"chosen": msgs("Q", "A"), "rejected": msgs("Q", "B")}],
                                      tokenizer=PrefixlessTemplate())
    assert ds[0] == {"prompt": "[user:Q]>", "chosen": "A<eos>", "rejected": "B<eos>", "row": 0}


def test_strings_with_chat_template_flag_and_in_memory_rows(tiny_tokenizer):
    ds, report = preference_data_from_rows(STRING_ROWS, chat_template=True, tokenizer=tiny_tokenizer)
    assert report.source == "<in-memory>" and report.kept == 3
    assert ds[0]["prompt"] == "<|user|>\nWhat is 12 + 34?\n<|assistant|>\n" and ds[0]["chosen"] == "46"
    extra = [{**r, "answer": i} for i, r in enumerate(STRING_ROWS)]
    ds, _ = preference_data_from_rows(extra, keep_columns=["answer"])
    assert ds["answer"] == [0, 1, 2]


def test_format_override_and_bad_format(tmp_path):
    path = write(tmp_path / "hh.jsonl", [{"chosen": hh("Q", "A"), "rejected": hh("Q", "B")}])
    with pytest.raises(DataError, match=r"hh\.jsonl: missing column\(s\) \['prompt'\]"):
        load_preference_data(path, format="strings")
    with pytest.raises(ConfigError, match="format='csv'"):
        load_preference_data(path, format="csv")
    # a prompt column with HH conversations can be forced to the hh shape
    both = write(tmp_path / "both.jsonl", [{"prompt": "x", "chosen": hh("Q", "A"), "rejected": hh("Q", "B")}])
    assert load_preference_data(both)[1].format == "strings"
    assert load_preference_data(both, format="hh")[0][0]["chosen"] == "A"


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_preference_data(tmp_path / "nope.jsonl")
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\na,b,c\n")
    with pytest.raises(DataError, match=r"pairs\.csv: unsupported file type; expected one of \.jsonl, \.json, "
                                        r"\.jsonl\.gz, \.parquet"):
        load_preference_data(csv)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')  # no good row has chosen/rejected: a file-level error
    with pytest.raises(DataError, match=r"bad\.jsonl: missing column\(s\) \['chosen', 'rejected'\]"):
        load_preference_data(bad)
    bad.write_text(json.dumps(GOOD) + '\n{oops\n')  # one malformed line is one skipped row, with its line
    ds, report = load_preference_data(bad)
    assert (report.total, report.kept, report.skipped, report.lines) == (2, 1, {"malformed_json": 1},
                                                                        {"malformed_json": [2]})


# ---------------------------------------------------------------- validation

GOOD = {"prompt": "P", "chosen": "C", "rejected": "R"}
BAD_STRING_ROWS = {
    "missing_field": {"prompt": "P", "chosen": "C"},
    "not_a_string": {"prompt": "P", "chosen": 5, "rejected": "R"},
    "empty_prompt": {"prompt": "  \n", "chosen": "C", "rejected": "R"},
    "empty_response": {"prompt": "P", "chosen": "C", "rejected": " "},
    "identical_responses": {"prompt": "P", "chosen": "same", "rejected": "same "},
}
BAD_HH_ROWS = {
    "no_assistant_turn": {"chosen": "\n\nHuman: Q", "rejected": hh("Q", "B")},
    "prompt_mismatch": {"chosen": hh("Q", "A"), "rejected": hh("Other Q", "B")},
    "empty_response": {"chosen": hh("Q", "") + "  ", "rejected": hh("Q", "B")},
    "empty_prompt": {"chosen": "\n\nAssistant: A", "rejected": "\n\nAssistant: B"},
}
BAD_MESSAGE_ROWS = {
    "missing_field": {"chosen": None, "rejected": msgs("Q", "B")},
    "malformed_messages": {"chosen": "not a list", "rejected": msgs("Q", "B")},
    "no_assistant_turn": {"chosen": msgs("Q", "A", "Q2"), "rejected": msgs("Q", "B", "Q2")},
    "prompt_mismatch": {"chosen": msgs("Q", "A"), "rejected": msgs("Q?", "B")},
    "empty_response": {"chosen": msgs("Q", ""), "rejected": msgs("Q", "B")},
    "identical_responses": {"chosen": msgs("Q", "A"), "rejected": msgs("Q", "A")},
}
GOOD_BY_SHAPE = {"strings": GOOD, "hh": {"chosen": hh("Q", "A"), "rejected": hh("Q", "B")},
                 "messages": {"chosen": msgs("Q", "A"), "rejected": msgs("Q", "B")}}
BAD_BY_SHAPE = {"strings": BAD_STRING_ROWS, "hh": BAD_HH_ROWS, "messages": BAD_MESSAGE_ROWS}


@pytest.mark.parametrize("shape", ["strings", "hh", "messages"])
def test_skip_mode_counts_each_reason(tmp_path, tiny_tokenizer, shape):
    bad = BAD_BY_SHAPE[shape]
    rows = [GOOD_BY_SHAPE[shape]]
    for row in bad.values():
        rows += [row, GOOD_BY_SHAPE[shape]]
    rows.append(next(iter(bad.values())))  # the first reason twice
    ds, report = preference_data_from_rows(rows, name="mem", format=shape, tokenizer=tiny_tokenizer)
    first = next(iter(bad))
    assert set(bad) <= set(REASONS)
    assert report.skipped == {r: 2 if r == first else 1 for r in bad}
    assert report.examples == {r: [2 * k + 1] + ([len(rows) - 1] if r == first else []) for k, r in enumerate(bad)}
    assert (report.total, report.kept) == (len(rows), len(bad) + 1)
    assert ds["row"] == [2 * k for k in range(len(bad) + 1)]
    assert f"kept {report.kept} of {report.total}" in report.summary() and "0-based" in report.summary()


def test_messages_items_without_content_are_malformed(tiny_tokenizer):
    row = {"chosen": [{"role": "user"}, {"role": "assistant", "content": "A"}], "rejected": msgs("Q", "B")}
    _, report = preference_data_from_rows([row, GOOD_BY_SHAPE["messages"]], tokenizer=tiny_tokenizer)
    assert report.skipped == {"malformed_messages": 1}


def test_strict_mode_names_file_row_and_reason(tmp_path):
    rows = [GOOD, GOOD, BAD_STRING_ROWS["empty_response"], BAD_STRING_ROWS["identical_responses"]]
    path = write(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=r"pairs\.jsonl: line 3 \(row 2, 0-based\): empty_response: field 'rejected'"):
        load_preference_data(path, strict=True)
    mixed = write(tmp_path / "mixed.jsonl", [GOOD, BAD_STRING_ROWS["not_a_string"]])
    with pytest.raises(DataError, match=r"mixed\.jsonl: line 2 \(row 1, 0-based\): not_a_string: field 'chosen': "
                                        r"expected a string, got int"):
        load_preference_data(mixed, strict=True)
    ds, report = load_preference_data(mixed)  # the same file loads in skip mode
    assert report.skipped == {"not_a_string": 1} and ds["row"] == [0]


def test_no_usable_rows_fails_clearly(tmp_path):
    path = write(tmp_path / "junk.jsonl", [BAD_STRING_ROWS["empty_prompt"], BAD_STRING_ROWS["identical_responses"]])
    with pytest.raises(DataError, match=r"junk\.jsonl: no usable rows out of 2 \(empty_prompt: 1, "
                                        r"identical_responses: 1\)"):
        load_preference_data(path)


# ---------------------------------------------------------------- tokenisation


def test_truncate_rules():
    prompt, a, b = list(range(10)), [100, 101, 102], [200, 201, 202, 203, 204, 205]
    assert truncate(prompt, [a, b], 16, 8, "keep_end") == (prompt, [a, b])  # fits: untouched
    assert truncate(prompt, [a, b], 14, 8, "keep_end") == (prompt[2:], [a, b])
    assert truncate(prompt, [a, b], 14, 8, "keep_start") == (prompt[:8], [a, b])
    # prompt cut to 4, then responses to 8 - 4 = 4 tokens
    assert truncate(prompt, [a, b], 8, 4, "keep_end") == ([6, 7, 8, 9], [a, b[:4]])


def test_check_lengths_names_fields():
    with pytest.raises(ConfigError, match="max_prompt_length=512 and max_length=512"):
        check_lengths(512, 512)
    with pytest.raises(ConfigError, match="truncation_mode='middle'"):
        check_lengths(512, 128, "middle")


def test_tokenize_pairs_bos_eos_and_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    prompt, chosen, rejected = "What is 12 + 34? Sort d b a c.", "The answer is 46.", "olleh"
    P, C, R = [bos] + enc(prompt), enc(chosen) + [eos], enc(rejected) + [eos]
    assert len(P) > 6 and len(C) > len(R) > 1
    ds = datasets.Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected, "row": 7},
                                     {"prompt": "<s>Hi", "chosen": "Yes</s>", "rejected": "No", "row": 9}])

    def run(max_length, max_prompt_length, mode="keep_end"):
        out = tokenize_pairs(ds, tok, max_length=max_length, max_prompt_length=max_prompt_length,
                             truncation_mode=mode)
        assert out.column_names == ["row", "prompt_ids", "chosen_ids", "rejected_ids"]
        return out

    full = run(1000, 500)
    assert full[0] == {"row": 7, "prompt_ids": P, "chosen_ids": C, "rejected_ids": R}
    # no second bos / eos when the text already has them
    assert full[1]["prompt_ids"] == [bos] + enc("Hi") and full[1]["chosen_ids"] == enc("Yes") + [eos]
    assert full[1]["rejected_ids"] == enc("No") + [eos]
    limit = len(P) + len(C) - 1  # one token too long: the prompt is cut, responses are not
    assert run(limit, 5)[0]["prompt_ids"] == P[-5:]
    assert run(limit, 5, "keep_start")[0]["prompt_ids"] == P[:5]
    assert run(limit, 5)[0]["chosen_ids"] == C
    short = run(5 + 3, 5)[0]  # prompt cut to 5, then responses to 8 - 5 = 3
    assert short == {"row": 7, "prompt_ids": P[-5:], "chosen_ids": C[:3], "rejected_ids": R[:3]}
    sft = tokenize_sft(ds, tok, max_length=8, max_prompt_length=5, truncation_mode="keep_start")
    assert sft.column_names == ["row", "prompt_ids", "response_ids"]
    assert sft[0] == {"row": 7, "prompt_ids": P[:5], "response_ids": C[:3]}


# ---------------------------------------------------------------- collation


def test_collate_pairs_pads_to_batch_longest():
    examples = [
        {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 10, 2], "row": 11,
         "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.0},
        {"prompt_ids": [1, 5], "chosen_ids": [3, 2], "rejected_ids": [2], "row": 4,
         "ref_chosen_logps": -0.5, "ref_rejected_logps": -3.0},
    ]
    b = collate_pairs(examples, pad_token_id=0)
    assert b["input_ids"].tolist() == [
        [1, 5, 6, 7, 2, 0, 0],
        [1, 5, 3, 2, 0, 0, 0],
        [1, 5, 6, 8, 9, 10, 2],
        [1, 5, 2, 0, 0, 0, 0],
    ]
    assert b["attention_mask"].sum(1).tolist() == [5, 4, 7, 3] and b["attention_mask"].dtype == torch.long
    assert b["response_mask"].dtype == torch.bool
    assert b["response_mask"].sum(1).tolist() == [2, 2, 4, 1]
    assert b["response_mask"][0].tolist() == [False, False, False, True, True, False, False]
    assert not (b["response_mask"] & ~b["attention_mask"].bool()).any()
    assert b["index"].tolist() == [11, 4] and b["index"].dtype == torch.long
    assert b["ref_chosen_logps"].tolist() == [-1.5, -0.5] and b["ref_rejected_logps"].tolist() == [-2.0, -3.0]
    assert collate_pairs(examples, 0, pad_to_multiple_of=4)["input_ids"].shape == (4, 8)
    plain = [{k: v for k, v in e.items() if not k.startswith("ref_")} for e in examples]
    assert "ref_chosen_logps" not in collate_pairs(plain, 0)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        collate_pairs([examples[0], plain[1]], 0)


def test_collate_sft():
    b = collate_sft([{"prompt_ids": [1, 5], "response_ids": [6, 7, 2], "row": 3},
                     {"prompt_ids": [1], "response_ids": [2], "row": 0}], pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 2, 0, 0, 0]]
    assert b["response_mask"].tolist() == [[False, False, True, True, True], [False, True, False, False, False]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["index"].tolist() == [3, 0]


# ---------------------------------------------------------------- held-out split


def test_prompt_disjoint_split_is_deterministic():
    rows = [{"prompt": f"p{i % 7}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(40)]
    ds, _ = preference_data_from_rows(rows)
    train, held = split_held_out(ds, 0.2, seed=3)
    assert len(train) + len(held) == 40 and len(held) >= 8
    assert not set(train["prompt"]) & set(held["prompt"])
    assert sorted(list(train["row"]) + list(held["row"])) == list(range(40))
    again = split_held_out(ds, 0.2, seed=3)
    assert (list(again[0]["row"]), list(again[1]["row"])) == (list(train["row"]), list(held["row"]))
    others = {tuple(split_held_out(ds, 0.2, seed=s)[1]["row"]) for s in range(6)}
    assert len(others) > 1  # the seed matters
    one_prompt, _ = preference_data_from_rows([{"prompt": "p", "chosen": f"c{i}", "rejected": "r"} for i in range(5)])
    with pytest.raises(DataError, match="1 distinct prompt"):
        split_held_out(one_prompt, 0.2)
    with pytest.raises(ConfigError, match="held_out_fraction=1.0"):
        split_held_out(ds, 1.0)


def test_load_with_held_out(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(20)]
    train_path, eval_path = write(tmp_path / "train.jsonl", rows), write(tmp_path / "eval.parquet", rows[:4])
    train, held, reports = load_with_held_out(train_path, eval_source=eval_path)
    assert (len(train), len(held), reports["held_out"].source) == (20, 4, str(eval_path))
    train, held, reports = load_with_held_out(train_path, held_out_fraction=0.25, seed=1)
    assert (len(train), len(held)) == (15, 5) and not set(train["prompt"]) & set(held["prompt"])
    # each split's report describes its own rows (the held-out one never repeats the training counts)
    assert (reports["train"].total, reports["train"].kept, reports["held_out"].total, reports["held_out"].kept) == \
        (15, 15, 5, 5)
    assert "held-out split: 0.25 by prompt, seed 1" in reports["held_out"].summary()
    with pytest.raises(ConfigError, match="a local file has no splits"):
        load_with_held_out(train_path, eval_split="test")


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not HH_FILE.exists(), reason=f"{HH_FILE} not present")
def test_real_hh_harmless_base_test(tiny_tokenizer):
    ds, report = load_preference_data(HH_FILE)
    # Counted independently: rows 1254, 1688, 1950, 1952, 2036 differ before the last "\n\nAssistant:";
    # rows 86, 516, 925, 1103 have an empty chosen or rejected response; no row has both problems.
    assert report.format == "hh" and report.total == 2312
    assert report.skipped == {"prompt_mismatch": 5, "empty_response": 4}
    assert report.examples == {"prompt_mismatch": [1254, 1688, 1950, 1952, 2036],
                               "empty_response": [86, 516, 925, 1103]}
    assert report.kept == len(ds) == 2312 - 9
    tok = tokenize_pairs(ds, tiny_tokenizer, max_length=512, max_prompt_length=384)
    assert len(tok) == 2312 - report.num_skipped
    lengths = [len(p) + max(len(c), len(r))
               for p, c, r in zip(tok["prompt_ids"], tok["chosen_ids"], tok["rejected_ids"])]
    assert max(lengths) <= 512 and max(lengths) == 512  # some conversations had to be truncated
    batch = collate_pairs([tok[i] for i in range(4)], tiny_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] == max(lengths[:4]) and batch["index"].tolist() == tok["row"][:4]
