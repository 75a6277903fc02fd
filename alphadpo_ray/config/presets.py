"""Embedded defaults: what `alphadpo-ray sweep` and `compare` run when given no CONFIG.

`experiments/sweeps/quickstart.yaml` and `experiments/sweeps/compare-quickstart.yaml` spell out
the same settings as files (a test keeps them identical).
"""

from __future__ import annotations

# One built-in-task run per trial: 1 worker (the direct path: the recipe runs inside the Tune trial),
# two trials at a time on a 2-core machine.
_TRIAL = {
    "data": {"source": "builtin", "max_eval_samples": 200},
    "training": {
        "learning_rate": 1.0e-4,
        "per_device_train_batch_size": 16,
        "total_batch_size": 16,
        "max_steps": 60,
        "eval_steps": 20,
        "logging_steps": 10,
        "save_steps": 20,
        "generation_eval_samples": 32,
    },
    "deepspeed": {"zero_stage": 0},
    "ray": {"num_workers": 1, "resources_per_worker": {"CPU": 1}},
}

QUICKSTART_SWEEP = {
    "name": "quickstart",
    **_TRIAL,
    "method": {"name": "alpha-dpo"},
    "tracking": {"experiment_name": "alphadpo-ray-sweeps"},
    "sweep": {
        "name": "quickstart-sweep",
        "num_samples": 8,
        "max_concurrent_trials": 2,
        "objective": "pareto",
        "accuracy_metric": "accuracy",
        "sampler": "tpe",
        "seed": 0,
    },
}

# Every registered method (sweep.methods unset): the eight built-ins, and any a config's plugins add.
COMPARE_QUICKSTART = {
    "name": "compare-quickstart",
    **_TRIAL,
    "tracking": {"experiment_name": "alphadpo-ray-compare"},
    "sweep": {
        "name": "compare-quickstart",
        "num_samples": 3,
        "seeds": 3,
        "max_concurrent_trials": 2,
        "seed": 0,
    },
}
