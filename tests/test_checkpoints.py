"""Checkpoints you can trust: every checkpoint carries manifests (size + sha256 of every file, written
last by each worker); a resumed run verifies them and falls back to the newest intact checkpoint.

Real Ray Train × DeepSpeed (2 workers, ZeRO-2, gloo) on the shared `ray_session`; one run is damaged
and re-run twice (three short runs), then fails before Ray starts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import small_config

pytestmark = pytest.mark.slow

TRAINING = {"max_steps": 6, "save_steps": 2, "eval_steps": 100, "logging_steps": 2}


def test_a_killed_writers_scratch_checkpoint_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A worker killed while writing a checkpoint leaves its temporary copy (a whole checkpoint share) in the
    temp folder; the next scratch directory made on this host removes those whose process is gone, and only
    those: a live process's, another host's and foreign folders stay."""
    import socket
    import subprocess
    import sys
    import tempfile

    from alphadpo_ray.training.recipe import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host = "".join(c for c in socket.gethostname().lower() if c.isalnum())[:24]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    names = {"dead": f"alphadpo-ckpt-r1-{host}-p{gone.pid}-x1y2", "live": f"alphadpo-resume-{host}-p{os.getpid()}-a_b",
             "other host": f"alphadpo-ckpt-r0-otherhost-p{gone.pid}-zz", "old style": "alphadpo-ckpt-r0-k3j9a_x2",
             "not ours": f"something-{host}-p{gone.pid}-q"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_states.pt").write_bytes(b"x" * 100)
    made = Path(scratch_dir("ckpt-r0"))
    assert made.parent == tmp_path and made.name.startswith(f"alphadpo-ckpt-r0-{host}-p{os.getpid()}-")
    assert {k for k, name in names.items() if (tmp_path / name).exists()} == {"live", "other host", "old style",
                                                                               "not ours"}


def test_manifest_catches_truncation_corruption_and_partial_saves(tmp_path):
    """The manifest check on its own (no Ray): each kind of damage is named."""
    from alphadpo_ray.training.recipe import verify_checkpoint, write_manifest

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
    from alphadpo_ray.training.launch import train
    from alphadpo_ray.training.recipe import CheckpointUnusable

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

    # 1. the two newest checkpoints bad: a truncated file of worker 1 in the latest (was: PytorchStreamReader
    # failed reading zip archive) and an empty trainer_state.json in the one before (was: JSONDecodeError)
    optim = next(at_6.glob("state/*rank_1*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    (at_4 / "trainer_state.json").write_text("")
    lines: list[str] = []
    second = train(config, log=lines.append)
    assert _quarantined(config, at_6, f"{optim.relative_to(at_6).as_posix()} truncated", lines)
    assert _quarantined(config, at_4, "trainer_state.json truncated: 0 of", lines)
    assert all(f"resuming from {at_2.name}" in line for line in lines if "is not usable" in line), lines
    assert "[resume] continuing from step 2 of 6" in _output(capfd, "[resume]")
    assert _final(second) == pytest.approx(_final(first), rel=1e-4, abs=1e-6)
    assert [h["train/loss"] for h in second["history"]] == pytest.approx(
        [h["train/loss"] for h in first["history"]], rel=2e-4, abs=2e-5)
    new_4, new_6 = _checkpoints(config)[1:]
    assert _intact(config) == [at_2.name, new_4.name, new_6.name]  # num_to_keep: 3, none of them bad

    # 2. Ray's snapshot left empty and the newest save cut short: a run killed while Ray's controller rewrote the
    # snapshot (seen in CI: every later start failed in Ray with CheckpointManagerInitializationError)
    from alphadpo_ray.compat import TRAIN_SNAPSHOT_FILE as RAY_SNAPSHOT_FILE

    (_run_dir(config) / RAY_SNAPSHOT_FILE).write_text("")
    cut_short = _checkpoints(config)[-1]
    (cut_short / "manifest_rank1.json").unlink()
    lines = []
    third = train(config, log=lines.append)
    assert any(line.startswith(f"[checkpoint] {_run_dir(config) / RAY_SNAPSHOT_FILE} was unreadable") and
               line.endswith(f"rebuilt from the 2 checkpoint(s) in storage; resuming from {new_4.name}")
               for line in lines), lines
    assert _quarantined(config, cut_short, "manifest_rank1.json missing (save cut short)", lines)
    assert "[resume] continuing from step 4 of 6" in _output(capfd, "[resume] continuing")
    assert _final(third) == pytest.approx(_final(first), rel=1e-4, abs=1e-6)
    assert _intact(config)[:2] == [at_2.name, new_4.name] and len(_intact(config)) == 3

    # 3. every checkpoint bad (the newest lost a worker's manifest: a save cut short) → a clear error before Ray
    # starts, naming each; nothing is moved, so the files can still be restored
    newest, older = _checkpoints(config)[-1], _checkpoints(config)[:-1]
    (newest / "manifest_rank1.json").unlink()
    for path in older:
        (path / "trainer_state.json").write_text("")
    with pytest.raises(CheckpointUnusable) as failed:
        train(config, log=lambda *_: None)
    message = str(failed.value)
    assert "no checkpoint passes its manifest check" in message
    assert f"{newest.name}: manifest_rank1.json missing (save cut short)" in message
    assert all(f"{path.name}: trainer_state.json truncated: 0 of" in message for path in older)
    assert _checkpoints(config) == [*older, newest]


def _run_dir(config) -> Path:
    return Path(config.storage_path(), config.run_name)


def _intact(config) -> list[str]:
    """The run's checkpoint_* directories, each checked intact, and exactly what Ray Train's snapshot lists."""
    from alphadpo_ray.compat import TRAIN_SNAPSHOT_FILE as RAY_SNAPSHOT_FILE
    from alphadpo_ray.training.recipe import verify_checkpoint

    names = [p.name for p in _checkpoints(config)]
    assert all(verify_checkpoint(_run_dir(config) / name) is None for name in names)
    snapshot = json.loads((_run_dir(config) / RAY_SNAPSHOT_FILE).read_text())
    assert sorted(e["checkpoint_dir_name"] for e in snapshot["checkpoint_results"]) == names
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == names[-1]
    return names


def _quarantined(config, bad: Path, why: str, lines: list[str]) -> bool:
    """`bad` left Ray Train's checkpoint_* names for the quarantine folder, with one line naming it."""
    from alphadpo_ray.training.launch import QUARANTINE_DIR

    said = [line for line in lines if str(bad) in line]
    moved = _run_dir(config) / QUARANTINE_DIR / bad.name
    assert len(said) == 1 and "is not usable" in said[0] and why in said[0] and str(moved) in said[0], lines
    return not bad.exists() and moved.is_dir()


def test_in_process_run_quarantines_a_truncated_checkpoint_and_keeps_two_intact(builtin_task, tmp_path):
    """The one-worker path (Ray Train's CheckpointManager in this process), `ray.num_to_keep: 2`: a truncated
    newest checkpoint is set aside before the resume, so retention keeps two intact ones (was: it kept the
    truncated one and deleted the intact one the run had resumed from)."""
    from alphadpo_ray.training.launch import train

    config = small_config(tmp_path, name=f"ckpt-inproc-{tmp_path.name[-6:]}", training=TRAINING,
                          ray={"num_workers": 1, "num_to_keep": 2, "max_failures": 0})
    first = train(config, log=lambda *_: None)
    at_4, at_6 = _checkpoints(config)
    model = next(at_6.glob("state/*model_states.pt"))
    os.truncate(model, 100)
    lines: list[str] = []
    second = train(config, log=lines.append)
    assert second["status"] == "finished"
    assert _quarantined(config, at_6, f"{model.relative_to(at_6).as_posix()} truncated: 100 of", lines)
    kept = _intact(config)
    assert len(kept) == 2 and kept[0] == at_4.name and kept[1] > at_6.name
    assert _final(second) == pytest.approx(_final(first), rel=1e-4, abs=1e-6)


def _fill_when_registered(run_dir: Path, ballast: Path, stop: threading.Event) -> threading.Thread:
    """Fill the disk under `run_dir` once Ray Train's snapshot lists a checkpoint (another process taking the
    space mid-run): `ballast` grows until the disk has no room left."""
    from alphadpo_ray.compat import TRAIN_SNAPSHOT_FILE as RAY_SNAPSHOT_FILE

    def fill():
        snapshot = run_dir / RAY_SNAPSHOT_FILE
        while not stop.is_set():
            try:
                if json.loads(snapshot.read_text()).get("checkpoint_results"):
                    break
            except (OSError, ValueError):
                pass
            stop.wait(0.01)
        else:
            return
        with open(ballast, "wb") as out:
            try:
                while True:
                    out.write(b"\0" * (1 << 16))
                    out.flush()
            except OSError:
                pass

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_at_a_save_names_the_path_removes_the_partial_checkpoint_and_keeps_the_earlier_one(
        builtin_task, tmp_path, small_disk, workers, request):
    """A real 64 MiB filesystem for ray.storage_path, filled by another writer once the first checkpoint is
    registered: the next save fails with ENOSPC. The error names the path, the incomplete checkpoint_* directory
    is removed (was: left for good), the earlier checkpoint stays intact and listed, and (in process) the run
    resumes from it once there is room again. In-process (1 worker) and through Ray Train's TorchTrainer (2 workers)."""
    from alphadpo_ray.training.launch import TrainingFailed, train

    if workers > 1:
        request.getfixturevalue("ray_session")
    disk = small_disk("64m")
    config = small_config(tmp_path, name=f"ckpt-full-{workers}-{tmp_path.name[-6:]}",
                          training={"max_steps": 6, "save_steps": 3, "eval_steps": 100, "logging_steps": 3},
                          ray={"num_workers": workers, "num_to_keep": 2, "max_failures": 0,
                               "storage_path": str(disk / "ray")})
    run_dir, ballast, stop = _run_dir(config), disk / "ballast", threading.Event()
    filler = _fill_when_registered(run_dir, ballast, stop)
    try:
        with pytest.raises(TrainingFailed) as failed:
            train(config, log=lambda *_: None)
    finally:
        stop.set()
        filler.join()
    message = str(failed.value)
    assert "no space left on device" in message and str(run_dir) in message, message
    assert "removed the incomplete checkpoint" in message or "that incomplete checkpoint was removed" in message
    (first,) = _intact(config)  # only the step-3 checkpoint: intact, listed; the failed save left nothing
    assert json.loads((run_dir / first / "trainer_state.json").read_text())["step"] == 3

    if workers == 1:  # Ray Train resuming from an intact listed checkpoint: the fallback test above
        ballast.unlink()
        resumed = train(config, log=lambda *_: None)
        assert resumed["status"] == "finished" and resumed["steps"] == 6
        assert len(_intact(config)) == 2
