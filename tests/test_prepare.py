"""Unit tests of `training/prepare.py`'s steps that need no model: where a run's models and data come from
(`_resolve_sources` for a config's own data), the size checks' messages, and the content-addressed
tables written under the run storage. `prepare_run` end to end runs in test_bad_inputs_data.py and
test_preflight.py."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from alphadpo_ray.config.experiment import config_from_dict, total_steps
from alphadpo_ray.errors import DataError
from alphadpo_ray.services import storage
from alphadpo_ray.training import prepare


def _config(tmp_path, model=None, **data):
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"prompt": "q", "chosen": " a", "rejected": " b"}) + "\n")
    return config_from_dict({
        "name": "prep", "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": "/models/policy", **(model or {})},
        "data": {"source": str(source), **data},
        "training": {"per_device_train_batch_size": 2, "total_batch_size": 4, "num_train_epochs": 2},
        "ray": {"num_workers": 2, "storage_path": str(tmp_path / "ray")},
        "tracking": {"enabled": False},
    })


def test_sources_of_a_configs_own_data_default_reference_and_tokenizer_to_the_policy(tmp_path):
    config = _config(tmp_path)
    sources = prepare._resolve_sources(config)
    assert (sources.policy, sources.reference, sources.tokenizer) == ("/models/policy",) * 3
    assert (sources.train, sources.eval, sources.builtin_task, sources.reference_metrics) == (
        config.data.source, None, False, None)
    assert sources.chat_template == config.data.chat_template


def test_sources_tokenizer_follows_the_reference_unless_given(tmp_path):
    sources = prepare._resolve_sources(_config(tmp_path, model={"reference": "/models/ref"}))
    assert (sources.policy, sources.reference, sources.tokenizer) == ("/models/policy", "/models/ref", "/models/ref")
    sources = prepare._resolve_sources(_config(tmp_path, model={"reference": "/models/ref", "tokenizer": "/tok"}))
    assert sources.tokenizer == "/tok"


def test_check_sizes_names_the_empty_split_and_returns_the_steps(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(DataError, match=r"^no usable training pairs left after validation of data\.source "
                                        rf"'{tmp_path}/pairs\.jsonl' \(see the skipped-row report above\)$"):
        prepare._check_sizes(config, 0, 10)
    with pytest.raises(DataError, match=r"^no usable held-out pairs left"):
        prepare._check_sizes(config, 10, 0)
    assert prepare._check_sizes(config, 40, 2) == total_steps(config, 40) == 20  # 40 pairs / 4 per step × 2 epochs


def _tables():
    train = pa.table({"row": [0, 1], "prompt_ids": [[1, 2], [3]], "chosen_ids": [[4], [5]], "rejected_ids": [[6], [7]]})
    held = pa.table({"row": [2], "prompt_ids": [[8]], "chosen_ids": [[9]], "rejected_ids": [[10]], "prompt": ["q"]})
    return train, held


def test_tables_are_written_once_under_a_content_address(tmp_path):
    config = _config(tmp_path)
    train, held = _tables()
    train_uri, eval_uri = prepare._write_tables(config, train, held, cache=None)
    folder = tmp_path / "ray" / "prepared"
    assert [p.name for p in folder.iterdir()] == [train_uri.split("/")[-2]] and len(train_uri.split("/")[-2]) == 16
    assert (train_uri, eval_uri) == (storage.join(str(folder), train_uri.split("/")[-2], "train.parquet"),
                                     storage.join(str(folder), train_uri.split("/")[-2], "eval.parquet"))
    assert storage.read_table(train_uri).equals(train) and storage.read_table(eval_uri).equals(held)

    marker = pa.table({"row": [99]})
    storage.write_table(train_uri, marker)  # a second prepare of the same data reuses what is there
    assert prepare._write_tables(config, train, held, cache=None) == (train_uri, eval_uri)
    assert storage.read_table(train_uri).equals(marker)

    other_cache = prepare._write_tables(config, train, held, cache={"key": "ref-1"})[0]
    other_data = prepare._write_tables(config, train.slice(0, 1), held, cache=None)[0]
    assert len({train_uri, other_cache, other_data}) == 3 and len(list(folder.iterdir())) == 3
