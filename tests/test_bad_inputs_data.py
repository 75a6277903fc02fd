"""Bad preference data, as users bring it: a corpus of broken files, each asserting the reason and the
row/line the skip report names, and the message `data.strict` fails with; file-level problems (an empty
file) fail clearly in both modes; pairs that truncation makes unscorable are skipped and counted; the
driver prints each split's report once; relative data paths reach the workers as absolute paths. No Ray."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from alphadpo_ray.cli import main as cli_main
from alphadpo_ray.config.experiment import config_from_dict, load_config
from alphadpo_ray.ml.data import PAIR_REASONS, REASONS, load_preference_data, preference_data_from_rows
from alphadpo_ray.ml.data import tokenize_pairs_with_report
from alphadpo_ray.errors import DataError


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def pair(i: int) -> dict:
    return {"prompt": f"Question {i}?", "chosen": f" good answer {i}", "rejected": f" bad {i}"}


def chat(i: int, *, user: str = "user", bot: str = "assistant", last: str | None = None) -> dict:
    q = {"role": user, "content": f"Question {i}?"}
    return {"chosen": [q, {"role": bot, "content": f"good {i}"}] + ([{"role": last, "content": "x"}] if last else []),
            "rejected": [q, {"role": "assistant", "content": f"bad {i}"}] + ([{"role": last, "content": "x"}] if last else [])}


GOOD = b"".join(line(pair(i)) for i in range(3))  # rows 0-2, lines 1-3
GOOD_CHAT = b"".join(line(chat(i)) for i in range(3))

# (id, file name, file bytes, reason, row (0-based), line (1-based) or None, what the strict message says)
ROW_CASES = [
    ("truncated-last-line", "chat.jsonl", GOOD_CHAT + line(chat(3))[:39],
     "malformed_json", 3, 4, r"expected one JSON object per line \(.*: column \d+\)"),
    ("truncated-last-line-strings", "pairs.jsonl", GOOD + b'{"prompt": "Q?", "chosen": "a", "rej',
     "malformed_json", 3, 4, r"Unterminated string"),
    ("malformed-middle-line", "pairs.jsonl", line(pair(0)) + b"{prompt: 'single quotes'}\n" + line(pair(2)) + line(pair(3)),
     "malformed_json", 1, 2, r"Expecting property name"),
    ("trailing-comma", "pairs.jsonl", GOOD + b'{"prompt": "a", "chosen": "b", "rejected": "c",}\n',
     "malformed_json", 3, 4, r"one JSON object per line"),
    ("array-on-a-line", "pairs.jsonl", GOOD + b'["a", "b", "c"]\n', "malformed_json", 3, 4, r"got a JSON array"),
    ("string-on-a-line", "pairs.jsonl", b'"just text"\n' + GOOD, "malformed_json", 0, 1, r"got a JSON string"),
    ("non-utf8-line", "pairs.jsonl", line(pair(0)) + line(pair(1)).replace(b"Question", b"Qu\xe9stion")
     + line(pair(2)) + line(pair(3)),
     "not_utf8", 1, 2, r"not_utf8: expected UTF-8 text \(byte 15 of the line, 0xe9"),
    ("cp1252-quotes", "pairs.jsonl", GOOD + b'{"prompt": "\x93hi\x94", "chosen": "a", "rejected": "b"}\n',
     "not_utf8", 3, 4, r"0x93"),
    ("blank-lines-count", "pairs.jsonl", line(pair(0)) + b"\n   \n" + b"{oops\n" + line(pair(1)) + line(pair(2)),
     "malformed_json", 1, 4, r"one JSON object per line"),
    ("crlf-truncated", "pairs.jsonl", GOOD.replace(b"\n", b"\r\n") + b'{"prompt": "Q', "malformed_json", 3, 4,
     r"Unterminated string"),
    ("bom-then-bad-line", "pairs.jsonl", b"\xef\xbb\xbf" + GOOD + b"{\n", "malformed_json", 3, 4, r"column 2"),
    ("gz-truncated-last-line", "pairs.jsonl.gz", gzip.compress(GOOD + b'{"prompt": "Q", "cho'),
     "malformed_json", 3, 4, r"Unterminated string"),
    ("json-file-of-lines", "pairs.json", GOOD + b"{oops}\n", "malformed_json", 3, 4, r"one JSON object per line"),
    ("unknown-role-bot", "chat.jsonl", GOOD_CHAT + line(chat(3, bot="bot")), "unknown_role", 3, 4,
     r"unknown_role: field 'chosen': expected message 1 to have a role in system, user, assistant, tool, got 'bot'"),
    ("sharegpt-roles", "chat.jsonl", line(chat(0, user="human")) + GOOD_CHAT, "unknown_role", 0, 1,
     r"message 0 to have a role in .*got 'human'"),
    ("wrong-type-int", "pairs.jsonl", GOOD + line({"prompt": "Q", "chosen": 5, "rejected": "b"}),
     "not_a_string", 3, 4, r"not_a_string: field 'chosen': expected a string, got int"),
    ("wrong-type-list-prompt", "pairs.jsonl", line({"prompt": ["Q"], "chosen": "a", "rejected": "b"}) + GOOD,
     "not_a_string", 0, 1, r"field 'prompt': expected a string, got list"),
    ("wrong-type-content", "chat.jsonl",
     GOOD_CHAT + line({"chosen": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}],
                       "rejected": chat(9)["rejected"]}),
     "malformed_messages", 3, 4, r"message 0 to be a dict with string role and content"),
    ("messages-as-string", "chat.jsonl", GOOD_CHAT + line({"chosen": "hello", "rejected": chat(1)["rejected"]}),
     "malformed_messages", 3, 4, r"a non-empty list of \{role, content\} messages, got str"),
    ("missing-field", "pairs.jsonl", GOOD + line({"prompt": "Q", "chosen": "a"}), "missing_field", 3, 4,
     r"missing_field: field 'rejected': expected a string"),
    ("null-field", "pairs.jsonl", line({"prompt": "Q", "chosen": None, "rejected": "b"}) + GOOD, "missing_field", 0, 1,
     r"field 'chosen'"),
    ("ends-with-user", "chat.jsonl", GOOD_CHAT + line(chat(3, last="user")), "no_assistant_turn", 3, 4,
     r"the last message to have role 'assistant', got 'user'"),
    ("empty-response", "pairs.jsonl", GOOD + line({"prompt": "Q", "chosen": "a", "rejected": "  "}),
     "empty_response", 3, 4, r"field 'rejected': expected a non-empty response"),
    ("identical-responses", "pairs.jsonl", GOOD + line({"prompt": "Q", "chosen": "a", "rejected": "a "}),
     "identical_responses", 3, 4, r"a response different from chosen"),
]


@pytest.mark.parametrize("case", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_bad_row_is_skipped_with_reason_and_line(tmp_path, tiny_tokenizer, case):
    _, name, content, reason, row, line_no, strict_detail = case
    path = tmp_path / name
    path.write_bytes(content)
    assert reason in REASONS
    ds, report = load_preference_data(path, tokenizer=tiny_tokenizer)
    assert report.skipped == {reason: 1} and report.examples == {reason: [row]}
    assert report.lines == {reason: [line_no]}
    assert (report.total, report.kept, len(ds)) == (4, 3, 3) and row not in ds["row"]
    where = f"row {row} = line {line_no}"
    assert f"skipped 1: {reason} 1 ({where})" in report.summary() and str(path) in report.summary()
    with pytest.raises(DataError) as err:
        load_preference_data(path, tokenizer=tiny_tokenizer, strict=True)
    message = str(err.value)
    assert message.startswith(f"{path}: line {line_no} (row {row}, 0-based): {reason}: "), message
    assert re.search(strict_detail, message), message
    assert "data.strict is on" in message


# (id, file name, file bytes, message) — problems with the whole file: the same error in both modes
FILE_CASES = [
    ("empty-file", "pairs.jsonl", b"", r"pairs\.jsonl: no rows \(the file is empty"),
    ("whitespace-only", "pairs.jsonl", b"\n  \n\t\n", r"pairs\.jsonl: no rows \(the file holds only whitespace"),
    ("empty-gz", "pairs.jsonl.gz", gzip.compress(b""), r"pairs\.jsonl\.gz: no rows \(the file is empty"),
    ("empty-json", "pairs.json", b"", r"pairs\.json: no rows \(the file is empty"),
    ("empty-json-array", "pairs.json", b"[]\n", r"pairs\.json: no rows \(an empty JSON array\)"),
    ("empty-parquet", "pairs.parquet", b"", r"pairs\.parquet: no rows \(the file is empty"),
    ("truncated-json-array", "pairs.json", b'[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "d", ',
     r"pairs\.json: not valid JSON at line 2, column \d+: .*one array of objects"),
    ("non-utf8-json-array", "pairs.json", b'[{"prompt": "a",\n "chosen": "\xff", "rejected": "c"}]',
     r"pairs\.json: line 2: not UTF-8 text \(byte 0xff\)"),
    ("not-gzip", "pairs.jsonl.gz", GOOD, r"pairs\.jsonl\.gz: could not read past line 0: BadGzipFile"),
    ("every-line-bad", "pairs.jsonl", b"{oops\n\xff\xfe\n",
     (r"pairs\.jsonl: no usable rows out of 2 \(malformed_json: 1, not_utf8: 1\)",
      r"pairs\.jsonl: line 1 \(row 0, 0-based\): malformed_json: ")),
    ("no-pair-columns", "pairs.jsonl", b'{"text": "hello"}\n{oops\n',
     r"pairs\.jsonl: missing column\(s\) \['chosen', 'rejected'\]; found \['text'\]"),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
@pytest.mark.parametrize("strict", [False, True])
def test_bad_file_fails_naming_the_file(tmp_path, case, strict):
    _, name, content, message = case
    if isinstance(message, tuple):  # (skip mode, strict mode)
        message = message[strict]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_preference_data(path, strict=strict)
    assert str(path) in str(err.value) and "Traceback" not in str(err.value)


def test_in_memory_rows_report_rows_without_lines():
    ds, report = preference_data_from_rows([pair(0), {"prompt": "Q", "chosen": 1, "rejected": "b"}, pair(2)])
    assert report.skipped == {"not_a_string": 1} and report.lines == {}
    assert "not_a_string 1 (row 1)" in report.summary() and "line" not in report.summary()
    with pytest.raises(DataError, match=r"^<in-memory>: no rows \(the source is empty\)"):
        preference_data_from_rows([])


# ---------------------------------------------------------------- truncation (tokenised pairs)


def _tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _pairs_ds(rows):
    ds, _ = preference_data_from_rows(rows)
    return ds


def test_long_prompt_with_keep_end_is_counted(tiny_tokenizer):
    question = " What is 12 + 34?"
    long_prompt = "Context: " + "the bread was baked with flour and water. " * 20 + question
    ds = _pairs_ds([{"prompt": long_prompt, "chosen": "46", "rejected": "47"}, pair(1), pair(2)])
    out, report = tokenize_pairs_with_report(ds, tiny_tokenizer, max_length=48, max_prompt_length=32,
                                             truncation_mode="keep_end", name="long.jsonl")
    assert (report.total, report.kept, report.truncated, report.prompt_truncated, report.response_truncated) == \
        (3, 3, 1, 1, 0)
    assert report.skipped == {} and report.lost_response == 0
    assert out[0]["prompt_ids"][-len(_tokens(tiny_tokenizer, question)):] == _tokens(tiny_tokenizer, question)
    assert "long.jsonl: 1 of 3 pairs truncated to data.max_length 48 (prompt cut in 1: keep_end kept its last 32 " \
           "tokens; a response cut in 0: its end and eos lost); 0 lost a whole response; 3 pairs left" in report.summary()
    _, start = tokenize_pairs_with_report(ds, tiny_tokenizer, max_length=48, max_prompt_length=32,
                                          truncation_mode="keep_start")
    assert start.prompt_truncated == 1 and "keep_start kept its first 32 tokens" in start.summary()


def test_long_responses_cut_to_the_same_tokens_are_skipped(tiny_tokenizer):
    shared = "Let me think step by step about the bread and the flour and the water. " * 4
    rows = [pair(0), {"prompt": "Q?", "chosen": shared + "So 46.", "rejected": shared + "So 47."},
            {"prompt": "R?", "chosen": "short " * 3 + "A " * 40, "rejected": "short " * 3 + "B " * 40}, pair(3)]
    ds = _pairs_ds(rows)
    out, report = tokenize_pairs_with_report(ds, tiny_tokenizer, max_length=40, max_prompt_length=16, name="long.jsonl")
    assert "identical_after_truncation" in PAIR_REASONS
    assert report.skipped == {"identical_after_truncation": 1} and report.examples == {"identical_after_truncation": [1]}
    assert (report.total, report.kept, report.response_truncated) == (4, 3, 2) and out["row"] == [0, 2, 3]
    assert out[1]["chosen_ids"] != out[1]["rejected_ids"]  # cut too, but still a preference
    assert "skipped 1 that cannot be scored: identical_after_truncation 1 (row 1); 3 pairs left" in report.summary()
    with pytest.raises(DataError, match=r"^long\.jsonl: row 1 \(0-based\): identical_after_truncation: after "
                                        r"truncation to data\.max_length 40 .*data\.strict is on"):
        tokenize_pairs_with_report(ds, tiny_tokenizer, max_length=40, max_prompt_length=16, name="long.jsonl",
                                   strict=True)


def test_response_with_no_tokens_of_its_own_is_skipped(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    ds = _pairs_ds([pair(0), {"prompt": "Q?", "chosen": "fine", "rejected": eos}, pair(2)])
    out, report = tokenize_pairs_with_report(ds, tiny_tokenizer, max_length=64, max_prompt_length=32, name="eos.jsonl")
    assert report.skipped == {"no_response_tokens": 1} and report.examples == {"no_response_tokens": [1]}
    assert report.lost_response == 1 and out["row"] == [0, 2]
    assert "1 lost a whole response; skipped 1 that cannot be scored: no_response_tokens 1 (row 1)" in report.summary()
    with pytest.raises(DataError, match=r"^eos\.jsonl: row 1 \(0-based\): no_response_tokens"):
        tokenize_pairs_with_report(ds, tiny_tokenizer, max_length=64, max_prompt_length=32, name="eos.jsonl",
                                   strict=True)


# ---------------------------------------------------------------- the driver: prepare_run and the CLI


def _config(tmp_path, model_dir, source, **data):
    return config_from_dict({
        "name": "bad-data",
        "output_dir": str(tmp_path / "outputs"),
        "model": {"name_or_path": str(model_dir)},
        "data": {"source": str(source), "held_out_fraction": 0.25, "max_length": 64, "max_prompt_length": 32, **data},
        "training": {"per_device_train_batch_size": 4, "total_batch_size": 8, "max_steps": 2},
        "ray": {"num_workers": 2, "storage_path": str(tmp_path / "ray")},
        "tracking": {"enabled": False},
    })


def _written(tmp_path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p.name != "chat.jsonl")


def test_prepare_prints_each_split_report_once(tmp_path, tiny_model_dir, caplog):
    from alphadpo_ray.training.prepare import prepare_run

    path = tmp_path / "chat.jsonl"
    question = {"role": "user", "content": "Q " * 50 + "what?"}
    long = {side: [question, {"role": "assistant", "content": "same start " * 30 + end}]
            for side, end in (("chosen", "A"), ("rejected", "B"))}  # identical once cut to max_length
    path.write_bytes(b"".join(line(chat(i)) for i in range(40)) + line(long) + line(chat(41, bot="bot"))
                     + line(chat(42))[:39])
    printed: list[str] = []
    with caplog.at_level("INFO"):
        plan = prepare_run(_config(tmp_path, tiny_model_dir, path), log=printed.append, need_reference=False)
    data_lines = [m for m in printed if m.startswith("[data]")]
    assert len(data_lines) == 2, printed  # the held-out split has no skipped or truncated rows: no line for it
    assert data_lines[0].startswith(f"[data] train: {path} (messages): kept 31 of 33 rows; skipped 2: ")
    assert "unknown_role 1 (row 41 = line 42); malformed_json 1 (row 42 = line 43)" in data_lines[0]
    assert data_lines[1].startswith(f"[data] train: {path}: 1 of 31 pairs truncated to data.max_length 64 (prompt cut "
                                    "in 1: keep_end kept its last 32 tokens; a response cut in 1")
    assert "skipped 1 that cannot be scored: identical_after_truncation 1 (row 40); 30 pairs left" in data_lines[1]
    assert not [r for r in caplog.records if "skipped" in r.getMessage() and r.levelname != "DEBUG"]
    train, held = plan.validation["train"], plan.validation["held_out"]
    assert (train["total"], train["kept"], held["total"], held["kept"], held["skipped"]) == (33, 31, 10, 10, {})
    assert "held-out split" in held["source"] and (plan.train_pairs, plan.eval_pairs) == (30, 10)
    assert train["truncation"]["skipped"] == {"identical_after_truncation": 1} and held["truncation"]["total"] == 10


def test_strict_prepare_fails_naming_the_line_and_writes_nothing(tmp_path, tiny_model_dir):
    from alphadpo_ray.training.prepare import prepare_run

    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"".join(line(chat(i)) for i in range(40)) + line(chat(40))[:39])
    config = _config(tmp_path, tiny_model_dir, path, strict=True)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: line 41 \(row 40, 0-based\): malformed_json: "):
        prepare_run(config, log=lambda *_: None, need_reference=False)
    assert not (tmp_path / "ray").exists() and not (tmp_path / "outputs").exists()


def test_cli_validate_with_relative_set_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rel.jsonl").write_bytes(GOOD)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("model: {name_or_path: some-org/some-model}\n")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["validate", str(cfg), "--set", "data.source=data/rel.jsonl"]) == 0
    config = load_config(cfg, ["data.source=data/rel.jsonl", "data.eval_source=./data/rel.jsonl"])
    assert config.to_dict()["data"]["source"] == str(tmp_path.resolve() / "data" / "rel.jsonl")
    assert config.to_dict()["data"]["eval_source"] == str(tmp_path.resolve() / "data" / "rel.jsonl")
    assert config_from_dict(config.to_dict()).data.source == config.data.source  # what a worker rebuilds
    monkeypatch.chdir(tmp_path / "data")  # a worker's other working directory: the path still names the file
    assert Path(config_from_dict(config.to_dict()).data.source).is_file()
    capsys.readouterr()
    assert cli_main(["validate", str(cfg), "--set", "data.source=missing.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "data.source: data file not found: missing.jsonl" in err and "Traceback" not in err


def test_a_directory_as_data_source_is_named_as_one(tmp_path):
    (tmp_path / "pairs").mkdir()
    with pytest.raises(DataError, match=rf"^{tmp_path / 'pairs'}: is a directory; expected a preference data file "
                                        r"\(\.jsonl/\.json/\.jsonl\.gz/\.parquet\) inside it"):
        load_preference_data(tmp_path / "pairs")
