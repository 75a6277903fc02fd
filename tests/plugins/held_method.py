"""A test method that holds a run at one training step: the one plugin the scenario tests share.

`tests/held.py` copies this file beside a run with its settings in ``held_method.json`` (same folder):
``name`` (the method's registered name), ``loss`` (``simpo``: SimPO with γ = 0, no reference; ``dpo``),
``step`` (the training step, counted in this process, at which to hold; with ``trial`` K: counted per Tune trial,
and only the K-th trial to start training holds — the order is kept in ``trials.log``, across processes, and
every training step is appended to ``calls.log`` as ``<trial id> <step>``) and ``action``:
- ``sleep``: while the file ``hold`` exists, take it (renamed ``held``, so the process that resumes goes
  on) and sleep until the test kills this process;
- ``wait``: touch ``waiting`` and wait for the file ``release`` (up to 300 s);
- ``fail``: while ``hold`` exists, take it and raise (a failure the run's retries must absorb)."""

import json
import time
from pathlib import Path

import torch

from alphadpo_ray.ml.losses import Hyperparameter, LossOutput, dpo_loss, register_method

HERE = Path(__file__).parent
SETTINGS = json.loads(Path(__file__).with_suffix(".json").read_text())
training_calls = 0
calls_by_trial: dict[str, int] = {}


def _hold() -> None:
    action, hold = SETTINGS["action"], HERE / "hold"
    if action == "wait":
        (HERE / "waiting").touch()
        deadline = time.time() + 300
        while not (HERE / "release").exists() and time.time() < deadline:
            time.sleep(0.05)
    elif hold.exists():
        hold.rename(HERE / "held")
        if action == "fail":
            raise RuntimeError(f"injected failure at step {SETTINGS['step']}")
        time.sleep(300)


def _trial_id() -> str:
    import ray.tune

    return ray.tune.get_context().get_trial_id()


def _trial_order(trial: str) -> int:
    """1-based: the order in which this sweep's trials first trained (``trials.log``)."""
    log = HERE / "trials.log"
    seen = log.read_text().split() if log.exists() else []
    if trial not in seen:
        with open(log, "a") as out:
            out.write(f"{trial}\n")
        seen.append(trial)
    return seen.index(trial) + 1


def held_loss(pc, pj, rc, rj, lc, lj, *, beta):
    """SimPO (γ = 0: −log σ(β(log π(y_w)/|y_w| − log π(y_l)/|y_l|))) or DPO, holding at one training step."""
    global training_calls
    if torch.is_grad_enabled() and "trial" in SETTINGS:
        trial = _trial_id()
        calls = calls_by_trial[trial] = calls_by_trial.get(trial, 0) + 1
        order = _trial_order(trial)  # registered at its first training step
        with open(HERE / "calls.log", "a") as log:
            log.write(f"{trial} {calls}\n")
        if calls == SETTINGS["step"] and order == SETTINGS["trial"]:
            _hold()
    elif torch.is_grad_enabled():
        training_calls += 1
        if training_calls == SETTINGS["step"]:
            _hold()
    if SETTINGS["loss"] == "dpo":
        return dpo_loss(pc, pj, rc, rj, lc, lj, beta=beta)
    nc, nj = pc / lc, pj / lj
    losses = -torch.nn.functional.logsigmoid(beta * (nc - nj))
    return LossOutput(losses.mean(), beta * nc.detach(), beta * nj.detach(), losses)


if SETTINGS["loss"] == "dpo":
    register_method(SETTINGS["name"], held_loss, needs_reference=True, implicit_reward="β·log π/π_ref",
                    hyperparameters={"beta": Hyperparameter(0.1, low=0, low_open=True)})
else:
    register_method(SETTINGS["name"], held_loss, needs_reference=False, implicit_reward="β·π̄",
                    hyperparameters={"beta": Hyperparameter(2.0, low=0, low_open=True)})
