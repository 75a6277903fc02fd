"""Unit tests of `training/in_process.py` that need no training: which runs train in this process. The
in-process fit itself (checkpoints through Ray Train's manager, retries) runs in test_run_identity.py."""

from __future__ import annotations

import pytest

from alphadpo_ray.config.experiment import config_from_dict
from alphadpo_ray.training.in_process import InProcessSession, runs_in_process


@pytest.mark.parametrize("ray, expected", [
    ({"num_workers": 1}, True),
    ({"num_workers": 2}, False),
    ({"num_workers": 1, "in_process_single_worker": False}, False),
    ({"num_workers": 1, "address": "ray://head:10001"}, False),
])
def test_one_worker_without_a_cluster_runs_in_process(ray, expected, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runs_in_process(config_from_dict({"ray": ray})) is expected


def test_ray_address_in_the_environment_means_a_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert runs_in_process(config_from_dict({"ray": {"num_workers": 1}})) is False


def test_session_persists_registers_and_keeps_checkpoints_as_ray_train_does(tmp_path):
    """Reports with a checkpoint: copied into ``{storage_path}/{run_name}``, registered in Ray Train's snapshot
    (``ray.num_to_keep`` applied), handed to the callbacks; a new session (a retry) resumes from the latest."""
    import json

    from alphadpo_ray import compat
    from alphadpo_ray.services.train_callbacks import ConsoleProgress

    config = config_from_dict({"name": "inproc", "ray": {"num_workers": 1, "num_to_keep": 1,
                                                          "storage_path": str(tmp_path / "ray")}})
    lines: list[str] = []
    progress = ConsoleProgress(log=lines.append)
    session = InProcessSession(config, [progress])
    assert (session.rank, session.world, session.preemption_notice(), session.get_checkpoint()) == (0, 1, None, None)
    for step in (2, 4):
        local = tmp_path / f"local-{step}"
        local.mkdir()
        (local / "state.bin").write_bytes(bytes([step]) * 8)
        session.report({"step": step, "train/loss": 0.5}, checkpoint_dir=str(local))
    session.report({"step": 5}, checkpoint_dir=None)
    assert (progress.step, progress.checkpoint_step) == (5, 4)
    run = tmp_path / "ray" / "inproc"
    kept = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
    snapshot = json.loads((run / compat.TRAIN_SNAPSHOT_FILE).read_text())
    assert len(kept) == 1 and compat.train_snapshot_latest(snapshot) == kept[0]  # num_to_keep 1: step 2's is gone
    assert (run / kept[0] / "state.bin").read_bytes() == bytes([4]) * 8
    again = InProcessSession(config, [])
    assert again.latest_checkpoint().path == session.latest_checkpoint().path == str(run / kept[0])
