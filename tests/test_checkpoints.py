"""Checkpoints you can trust: every checkpoint carries manifests (size + sha256 of every file, written
last by each worker); a resumed run verifies them and falls back to the newest intact checkpoint.

Real Ray Train × DeepSpeed (2 workers, ZeRO-2, gloo) on the shared `ray_session`; one run is damaged
and re-run three times, so the whole module costs four short runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import small_config

pytestmark = pytest.mark.slow

TRAINING = {"max_steps": 6, "save_steps": 2, "eval_steps": 100, "logging_steps": 2}


def test_manifest_catches_truncation_corruption_and_partial_saves(tmp_path):
    """The manifest check on its own (no Ray): each kind of damage is named."""
    from alphadpo_ray.recipe import verify_checkpoint, write_manifest

    ckpt = tmp_path / "checkpoint_000001"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "state" / "model_states.pt").write_bytes(b"x" * 1000)
    (ckpt / "trainer_state.json").write_text('{"step": 2}')
    write_manifest(ckpt, 0, 2, 2)
    assert verify_checkpoint(ckpt) == "manifest_rank1.json missing (save cut short)"
    rank1 = tmp_path / "rank1"
    (rank1 / "state").mkdir(parents=True)
    (rank1 / "state" / "optim_rank1.pt").write_bytes(b"y" * 500)
    write_manifest(rank1, 1, 2, 2)
    for path in rank1.rglob("*"):  # what Ray does: each worker's files land in the same checkpoint
        if path.is_file():
            (ckpt / path.relative_to(rank1)).write_bytes(path.read_bytes())
    assert verify_checkpoint(ckpt, 0, 2) is None and verify_checkpoint(ckpt, 1, 2) is None

    (ckpt / "state" / "optim_rank1.pt").write_bytes(b"y" * 200)
    assert verify_checkpoint(ckpt, 0, 2) == "state/optim_rank1.pt truncated: 200 of 500 bytes"
    (ckpt / "state" / "optim_rank1.pt").write_bytes(b"z" * 500)  # same size, other bytes
    assert verify_checkpoint(ckpt, 0, 2) is None  # worker 0 hashes rank 0's files only ...
    assert verify_checkpoint(ckpt, 1, 2) == "state/optim_rank1.pt corrupt (sha256 differs from manifest_rank1.json)"
    assert "corrupt" in verify_checkpoint(ckpt, 0, 1)  # one worker hashes everything
    (ckpt / "manifest_rank0.json").write_text("")
    assert verify_checkpoint(ckpt) == "manifest_rank0.json unreadable (JSONDecodeError)"


def _checkpoints(config) -> list[Path]:
    return sorted(p for p in Path(config.storage_path(), config.run_name).glob("checkpoint_*") if p.is_dir())


def _final(summary: dict) -> dict:
    return {k: v for k, v in summary["final_eval"].items() if isinstance(v, float)}


def _output(capfd, expected: str, wait: float = 15.0) -> str:
    """Everything printed so far (workers' lines reach the driver through Ray's log monitor, with a lag)."""
    text, deadline = "", time.time() + wait
    while True:
        out, err = capfd.readouterr()
        text += out + err
        if expected in text or time.time() > deadline:
            return text
        time.sleep(0.5)


def test_bad_latest_checkpoint_falls_back_to_the_newest_intact_one(ray_session, builtin_task, tmp_path, capfd):
    from alphadpo_ray.launch import TrainingFailed, train

    config = small_config(tmp_path, name=f"ckpt-fallback-{tmp_path.name[-6:]}", training=TRAINING,
                          ray={"num_to_keep": 3, "max_failures": 0})
    first = train(config, log=lambda *_: None)  # uninterrupted: checkpoints at steps 2, 4, 6
    assert first["status"] == "finished"
    at_2, at_4, at_6 = _checkpoints(config)
    manifests = {p.name for p in at_6.glob("manifest_rank*.json")}
    assert manifests == {"manifest_rank0.json", "manifest_rank1.json"}
    listed = set(json.loads((at_6 / "manifest_rank0.json").read_text())["files"]) | set(
        json.loads((at_6 / "manifest_rank1.json").read_text())["files"])
    on_disk = {p.relative_to(at_6).as_posix() for p in at_6.rglob("*") if p.is_file()} - manifests
    assert listed == on_disk  # every file of every worker is covered
    capfd.readouterr()

    # 1. a truncated file of worker 1 in the latest checkpoint (was: PytorchStreamReader failed reading zip archive)
    optim = next(at_6.glob("state/*rank_1*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    second = train(config, log=lambda *_: None)
    text = _output(capfd, f"checkpoint {at_6.name} is not usable")
    assert f"checkpoint {at_6.name} is not usable: {optim.relative_to(at_6).as_posix()} truncated" in text
    assert f"[resume] continuing from step 4 of 6 (checkpoint {at_4.name}, skipped {at_6.name})" in _output(
        capfd, "[resume]", wait=5) + text
    assert _final(second) == pytest.approx(_final(first), rel=1e-4, abs=1e-6)
    assert [h["train/loss"] for h in second["history"]] == pytest.approx(
        [h["train/loss"] for h in first["history"]], rel=2e-4, abs=2e-5)

    # 2. an empty trainer_state.json in the (new) latest one (was: JSONDecodeError); the truncated one is skipped too
    new_6 = _checkpoints(config)[-1]
    assert new_6.name > at_6.name and not at_2.exists()  # num_to_keep: 3
    (new_6 / "trainer_state.json").write_text("")
    third = train(config, log=lambda *_: None)
    text = _output(capfd, "[resume] continuing")
    assert f"checkpoint {new_6.name} is not usable: trainer_state.json truncated: 0 of" in text
    assert f"checkpoint {at_6.name} is not usable" in text
    assert f"continuing from step 4 of 6 (checkpoint {at_4.name}, skipped {new_6.name}, {at_6.name})" in text
    assert _final(third) == pytest.approx(_final(first), rel=1e-4, abs=1e-6)

    # 3. every checkpoint bad: the newest one lost a worker's manifest (a save cut short) → a clear error
    newest = _checkpoints(config)[-1]
    assert not at_4.exists()
    (newest / "manifest_rank1.json").unlink()
    with pytest.raises(TrainingFailed) as failed:
        train(config, log=lambda *_: None)
    message = str(failed.value)
    assert "no checkpoint passes its manifest check" in message
    assert f"{newest.name}: manifest_rank1.json missing (save cut short)" in message
    assert f"{new_6.name}: trainer_state.json truncated: 0 of" in message
    assert f"{at_6.name}: {optim.relative_to(at_6).as_posix()} truncated" in message
