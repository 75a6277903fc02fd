"""Unit tests of `training/plan.py`: the driver → worker contract survives the trip a worker's
``train_loop_config`` makes (a plain dict, pickled)."""

from __future__ import annotations

import pickle

from alphadpo_ray.training.plan import PreparedRun


def _plan(**extra) -> PreparedRun:
    return PreparedRun(policy_path="/m/p", reference_path="/m/r", tokenizer_path="/m/t", train_uri="s3://b/t.parquet",
                       eval_uri="s3://b/e.parquet", train_pairs=40, eval_pairs=8, total_steps=10, builtin_task=False,
                       **extra)


def test_to_dict_holds_every_field_and_rebuilds_the_plan():
    plan = _plan(reference_cache={"uri": "/c", "key": "k", "hit": True, "seconds": 1.5})
    data = plan.to_dict()
    assert data == {"policy_path": "/m/p", "reference_path": "/m/r", "tokenizer_path": "/m/t",
                    "train_uri": "s3://b/t.parquet", "eval_uri": "s3://b/e.parquet", "train_pairs": 40,
                    "eval_pairs": 8, "total_steps": 10, "builtin_task": False,
                    "reference_cache": {"uri": "/c", "key": "k", "hit": True, "seconds": 1.5},
                    "validation": {}, "reference_metrics": None}
    assert PreparedRun(**pickle.loads(pickle.dumps(data))) == plan


def test_validation_default_is_not_shared_between_plans():
    first, second = _plan(), _plan()
    first.validation["train"] = {"kept": 1}
    assert second.validation == {} and first.to_dict()["validation"] == {"train": {"kept": 1}}
