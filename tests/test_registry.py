"""Adding a method touches its function, its registry entry and its tests — nothing else.

A toy method lives in a plugin file written by the test (the way a user adds one): it registers
itself with `alphadpo_ray.ml.losses.register_method`, and a config names it under ``plugins``. It then
validates, gets its search space and paper points from its entry, and runs through `compare`
(Ray Tune trials that load the plugin in their own processes).
"""

from __future__ import annotations

import textwrap

import pytest
import yaml
from conftest import small_config

from alphadpo_ray.cli import main
from alphadpo_ray.errors import ConfigError
from alphadpo_ray.ml.losses import method_names, method_spec, unregister_method

TOY = "toy-hinge"
PLUGIN = textwrap.dedent('''
    """A reference-free hinge loss on length-normalised log-probs (SLiC-style), for the registry test."""
    import torch

    from alphadpo_ray.ml.losses import Hyperparameter, LossOutput, register_method


    def toy_hinge_loss(pc, pj, rc, rj, lc, lj, *, beta, delta):
        """loss = max(0, delta - (π̄c - π̄j)); rewards beta·π̄."""
        nc, nj = pc / lc, pj / lj
        losses = torch.relu(delta - (nc - nj))
        return LossOutput(losses.mean(), beta * nc.detach(), beta * nj.detach(), losses)


    register_method(
        "toy-hinge", toy_hinge_loss, needs_reference=False, implicit_reward="β·π̄", source="test",
        hyperparameters={
            "beta": Hyperparameter(1.0, low=0, low_open=True),
            "delta": Hyperparameter(low=0, start=0.5, space={"type": "uniform", "low": 0.1, "high": 1.0}),
        },
        paper_points=({"delta": 0.3},),
    )
''')


@pytest.fixture
def toy_plugin(tmp_path):
    path = tmp_path / "toy_method.py"
    path.write_text(PLUGIN)
    yield str(path)
    unregister_method(TOY)


def test_a_plugin_method_validates_and_gets_its_space_from_its_entry(toy_plugin, tmp_path, capsys):
    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.config.sweep_settings import SweepConfig, method_space, starting_points

    config = config_from_dict({"plugins": [toy_plugin], "method": {"name": TOY}})
    assert TOY in method_names() and config.method.resolved() == {"beta": 1.0, "delta": 0.5}  # start value
    space = method_space(SweepConfig(), TOY, config.training.learning_rate)
    assert space["delta"] == {"type": "uniform", "low": 0.1, "high": 1.0} and "learning_rate" in space
    assert "beta" not in space  # no default space in its entry: not searched
    points = starting_points(SweepConfig(), TOY, space, {**config.method.resolved(), "learning_rate": 5e-4})
    assert points == [{"learning_rate": 5e-4, "delta": 0.3}]
    assert method_spec(TOY).needs_reference is False and method_spec(TOY).implicit_reward == "β·π̄"

    with pytest.raises(ConfigError, match=r"method\.delta: must be >= 0, got -1 \(method 'toy-hinge'\)"):
        config_from_dict({"plugins": [toy_plugin], "method": {"name": TOY, "delta": -1}})
    with pytest.raises(ConfigError, match=r"method\.alpha: method 'toy-hinge' does not take this hyperparameter"):
        config_from_dict({"plugins": [toy_plugin], "method": {"name": TOY, "alpha": 1}})
    with pytest.raises(ConfigError, match=r"sweep\.search_space\.delta: the space reaches -0\.5, outside the valid "
                                          r"range \(must be >= 0\)"):
        config_from_dict({"plugins": [toy_plugin], "method": {"name": TOY},
                          "sweep": {"search_space": {"delta": {"type": "uniform", "low": -0.5, "high": 1}}}})

    config_file = tmp_path / "toy.yaml"
    config_file.write_text(yaml.safe_dump({"plugins": ["toy_method.py"], "method": {"name": TOY, "delta": 0.2}}))
    assert main(["validate", str(config_file)]) == 0  # the plugin path is resolved beside the config
    assert f"ok  {config_file}  ({TOY}" in capsys.readouterr().out


def test_a_broken_plugin_is_a_config_error(tmp_path):
    from alphadpo_ray.config.experiment import config_from_dict

    with pytest.raises(ConfigError, match=r"plugins: could not load .*missing\.py.*plugin file not found"):
        config_from_dict({"plugins": [str(tmp_path / "missing.py")]})
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"plugins: could not load .*bad\.py.*RuntimeError: boom"):
        config_from_dict({"plugins": [str(bad)]})
    with pytest.raises(ConfigError, match="unknown method 'not-registered'"):
        config_from_dict({"method": {"name": "not-registered"}})


@pytest.mark.slow
def test_a_plugin_method_runs_through_compare(ray_session, builtin_task, toy_plugin, tmp_path):
    from alphadpo_ray.sweep.run import run_compare

    training = {"per_device_train_batch_size": 8, "total_batch_size": 8, "max_steps": 4, "eval_steps": 2,
                "logging_steps": 2, "save_steps": 2, "generation_eval_samples": 0}
    config = small_config(tmp_path, name="toy", plugins=[toy_plugin], ray={"num_workers": 1},
                          deepspeed={"zero_stage": 0}, training=training,
                          sweep={"name": "toy-compare", "methods": [TOY, "simpo"], "num_samples": 1,
                                 "seeds": 0, "max_concurrent_trials": 1})
    summary = run_compare(config, log=lambda *_: None)
    methods = {s["method"]: s for s in summary["methods"]}
    assert set(methods) == {TOY, "simpo"}
    assert methods[TOY]["trials"] == 1 and methods[TOY]["failed"] == 0 and methods[TOY]["steps"] == 4
    assert methods[TOY]["best_accuracy_logratio"] is not None


def test_every_built_in_hyperparameter_declares_its_range():
    """Config values and `--set` values are checked against the registry's ranges, so each built-in
    hyperparameter has one (a negative gamma_beta_ratio or length_alpha is refused naming the range)."""
    from alphadpo_ray.ml.losses import hyperparameter_problems

    for name in ("alpha-dpo", "dpo", "simpo", "ipo", "cpo", "kto", "orpo", "r-dpo"):
        for key, h in method_spec(name).hyperparameters.items():
            assert h.expected, f"{name}.{key} has no range"
    assert hyperparameter_problems("simpo", {"beta": 2.0, "gamma_beta_ratio": -3}) == \
        [("gamma_beta_ratio", "must be >= 0, got -3 (method 'simpo')")]
