"""Unit tests of `training/launch.py`'s helpers that need no Ray: the run fingerprint and the refusal
message, the identity check on a run's storage (real files in tmp_path), checkpoint screening and the
removal of saves Ray never registered, the stored-summary shortcut, the resumed run's note, the worker
environment in this process, and the policy export. The whole `train` runs in test_run_identity.py and
test_checkpoints.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ray.train import Checkpoint

from alphadpo_ray import compat
from alphadpo_ray.config.experiment import config_from_dict
from alphadpo_ray.training import launch
from alphadpo_ray.training.launch import IDENTITY_FILE, QUARANTINE_DIR, RunConfigChanged, run_fingerprint
from alphadpo_ray.training.recipe import CheckpointUnusable, write_manifest


def _config(tmp_path, **sections):
    base = {"name": "unit", "output_dir": str(tmp_path / "out"), "ray": {"storage_path": str(tmp_path / "ray")},
            "tracking": {"enabled": False}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return config_from_dict(base)


def _snapshot(run: Path, names: list[str], latest: str | None = None) -> None:
    """Ray Train's checkpoint-manager snapshot listing `names` (the keys `compat` reads)."""
    run.mkdir(parents=True, exist_ok=True)
    results = [{"checkpoint_dir_name": n} for n in names]
    latest = latest or (names[-1] if names else None)
    (run / compat.TRAIN_SNAPSHOT_FILE).write_text(json.dumps({
        "checkpoint_results": results, "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": {"checkpoint_dir_name": latest} if latest else None}))


def _checkpoint(run: Path, name: str, step: int, corrupt: bool = False) -> Path:
    folder = run / name
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"weights" * 10)
    write_manifest(folder, rank=0, world=1, step=step)
    if corrupt:
        (folder / "model.bin").write_bytes(b"WEIGHTS" * 10)  # same size, other bytes
    return folder


def test_fingerprint_ignores_names_places_and_batch_splits_but_not_hyperparameters(tmp_path):
    digest, settings = run_fingerprint(_config(tmp_path))
    other_place = _config(tmp_path / "elsewhere", ray={"num_workers": 1, "max_failures": 3},
                          training={"logging_steps": 7})
    assert run_fingerprint(other_place)[0] == digest
    assert run_fingerprint(_config(tmp_path, training={"learning_rate": 1e-3}))[0] != digest
    assert run_fingerprint(_config(tmp_path, training={"seed": 1234}))[0] != digest
    assert {"method.name", "method.beta", "ray.use_gpu"} <= set(settings)
    assert not {"name", "ray.num_workers", "ray.storage_path", "training.logging_steps"} & set(settings)
    assert not any(k.startswith(("tracking.", "output_dir")) for k in settings)
    assert len(digest) == 64


def test_changed_message_lists_each_changed_key_and_how_to_go_on(tmp_path):
    config = _config(tmp_path)
    text = launch._changed_message(config, "/runs/unit", {"training.seed": 1, "data.gone": "x"},
                                   {"training.seed": 2, "data.new": 3})
    assert text.splitlines() == [
        "run 'unit' has checkpoints in /runs/unit from a different config; resuming would continue that run under "
        "other settings:",
        "  data.gone: 'x' → (unset)", "  data.new: (unset) → 3", "  training.seed: 1 → 2",
        "Nothing was started. Give this config a new run name (--set name=NEW (or --set tracking.run_name=NEW)), or "
        "start over, replacing the stored run and starting a new MLflow run: alphadpo-ray train CONFIG --restart"]


def test_identity_fresh_continued_refused_and_restarted(tmp_path):
    config = _config(tmp_path)
    run = Path(config.storage_path()) / config.run_name
    identity = launch._check_identity(config, restart=False, log=print)
    assert (identity.uri, identity.fresh, identity.previous) == (str(run), True, None)

    _snapshot(run, ["checkpoint_2026-01-01_00-00-00.000000"])
    (run / IDENTITY_FILE).write_text(json.dumps({"fingerprint": identity.fingerprint, "settings": identity.settings}))
    same = launch._check_identity(config, restart=False, log=print)
    assert not same.fresh and same.previous["fingerprint"] == identity.fingerprint

    changed = _config(tmp_path, training={"learning_rate": 1e-3})
    with pytest.raises(RunConfigChanged, match=r"(?s)run 'unit' has checkpoints in .*  training\.learning_rate: "):
        launch._check_identity(changed, restart=False, log=print)
    assert (run / IDENTITY_FILE).is_file()  # refused: nothing moved

    lines: list[str] = []
    restarted = launch._check_identity(changed, restart=True, log=lines.append)
    assert restarted.fresh and restarted.previous is None and not run.exists()
    aside = [p for p in run.parent.iterdir() if p.name.startswith("unit.replaced-")]
    assert len(aside) == 1 and (aside[0] / IDENTITY_FILE).is_file()
    assert lines == [f"[restart] unit: old run storage moved to {aside[0]}; starting over"]


def test_remove_failed_saves_deletes_only_new_unregistered_checkpoint_folders(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint_1", "checkpoint_2", "checkpoint_3", "checkpoint_4"):
        (run / name).mkdir(parents=True)
    (run / "not_a_checkpoint").mkdir()
    _snapshot(run, ["checkpoint_1", "checkpoint_3"])
    lines: list[str] = []
    removed = launch.remove_failed_saves(str(run), before={"checkpoint_2"}, log=lines.append)
    assert removed == [str(run / "checkpoint_4")]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "checkpoint_1", "checkpoint_2", "checkpoint_3", "not_a_checkpoint"]
    assert lines == [f"[checkpoint] removed {run / 'checkpoint_4'}: its save did not complete (never registered by "
                     "Ray Train)"]
    assert launch.remove_failed_saves(str(tmp_path / "missing"), before=set()) == []


def test_screen_checkpoints_sets_a_bad_latest_aside_and_resumes_from_the_intact_one(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, "checkpoint_1", 1)
    _checkpoint(run, "checkpoint_2", 2, corrupt=True)
    _snapshot(run, ["checkpoint_1", "checkpoint_2"])
    lines: list[str] = []
    launch.screen_checkpoints(str(run), log=lines.append)
    snapshot = json.loads((run / compat.TRAIN_SNAPSHOT_FILE).read_text())
    assert compat.train_snapshot_checkpoints(snapshot) == ["checkpoint_1", "checkpoint_1"]  # kept + latest
    assert compat.train_snapshot_latest(snapshot) == "checkpoint_1"
    assert (run / QUARANTINE_DIR / "checkpoint_2" / "model.bin").is_file() and not (run / "checkpoint_2").exists()
    assert len(lines) == 1 and lines[0].startswith(f"[checkpoint] {run / 'checkpoint_2'} is not usable (")
    assert lines[0].endswith(f"moved to {run / QUARANTINE_DIR / 'checkpoint_2'}; resuming from checkpoint_1 "
                             "(a bad checkpoint is never counted toward ray.num_to_keep)")
    before = (run / compat.TRAIN_SNAPSHOT_FILE).read_bytes()
    launch.screen_checkpoints(str(run), log=lines.append)  # intact now: nothing said, nothing changed
    assert len(lines) == 1 and (run / compat.TRAIN_SNAPSHOT_FILE).read_bytes() == before


def test_screen_checkpoints_with_none_intact_refuses_and_moves_nothing(tmp_path):
    run = tmp_path / "run"
    _checkpoint(run, "checkpoint_1", 1, corrupt=True)
    (run / "checkpoint_2").mkdir()  # no manifest: a save cut short
    _snapshot(run, ["checkpoint_1", "checkpoint_2"])
    before = (run / compat.TRAIN_SNAPSHOT_FILE).read_bytes()
    with pytest.raises(CheckpointUnusable, match=r"no checkpoint passes its manifest check .*checkpoint_2: "
                                                 r"manifest_rank0\.json missing \(save cut short\); checkpoint_1: "):
        launch.screen_checkpoints(str(run))
    assert (run / compat.TRAIN_SNAPSHOT_FILE).read_bytes() == before and not (run / QUARANTINE_DIR).exists()
    launch.screen_checkpoints(str(tmp_path / "no-run"))  # nothing stored: nothing to screen


def test_an_unreadable_snapshot_is_rebuilt_from_the_intact_checkpoints_and_ray_loads_it(tmp_path):
    """A run killed while Ray's controller rewrote its snapshot leaves it empty (seen in CI: every later
    start failed with CheckpointManagerInitializationError). The file is kept, the snapshot rebuilt in
    Ray's own layout (Ray's manager loads it), the newest intact checkpoint the latest; a newer save cut
    short is set aside."""
    storage_path, run = tmp_path / "ray", tmp_path / "ray" / "unit"
    for step in (2, 4, 6):
        _checkpoint(run, f"checkpoint_2026-12-06_10-00-0{step}.000000", step)
    (run / "checkpoint_2026-12-06_10-00-08.000000").mkdir()  # the save the kill cut short: no manifest
    (run / compat.TRAIN_SNAPSHOT_FILE).write_text("")
    lines: list[str] = []
    launch.repair_snapshot(str(storage_path), "unit", log=lines.append)

    kept = sorted(run.glob(f"{compat.TRAIN_SNAPSHOT_FILE}.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == ""
    _, manager = compat.train_checkpoint_manager(str(storage_path), "unit", None)  # what Ray's controller does
    latest = compat.latest_train_checkpoint(manager)
    assert Path(latest.path).name == "checkpoint_2026-12-06_10-00-06.000000"
    snapshot = json.loads((run / compat.TRAIN_SNAPSHOT_FILE).read_text())
    assert compat.train_snapshot_checkpoints(snapshot)[:3] == [f"checkpoint_2026-12-06_10-00-0{s}.000000"
                                                               for s in (2, 4, 6)]
    assert [r["metrics"]["step"] for r in snapshot["checkpoint_results"]] == [2, 4, 6]
    assert (run / QUARANTINE_DIR / "checkpoint_2026-12-06_10-00-08.000000").is_dir()
    assert lines[0] == (f"[checkpoint] {run / compat.TRAIN_SNAPSHOT_FILE} was unreadable (a run stopped while Ray "
                        f"Train rewrote it): kept as {kept[0]} and rebuilt from the 3 checkpoint(s) in storage; "
                        "resuming from checkpoint_2026-12-06_10-00-06.000000")
    assert len(lines) == 2 and "checkpoint_2026-12-06_10-00-08.000000 is not usable (manifest_rank0.json missing" \
        in lines[1]
    identity = launch._check_identity(_config(tmp_path), restart=False, log=lines.append)
    assert not identity.fresh and len(lines) == 2  # a readable snapshot: nothing more to do, the run resumes


def test_an_unreadable_snapshot_with_no_intact_checkpoint_refuses_and_without_any_starts_afresh(tmp_path):
    storage_path, run = tmp_path / "ray", tmp_path / "ray" / "run"
    _checkpoint(run, "checkpoint_1", 1, corrupt=True)
    (run / compat.TRAIN_SNAPSHOT_FILE).write_text('{"checkpoint_res')
    with pytest.raises(CheckpointUnusable, match=r"snapshot checkpoint_manager_snapshot\.json is unreadable and no "
                                                 r"checkpoint passes its manifest check .*checkpoint_1: model\.bin "):
        launch.repair_snapshot(str(storage_path), "run")
    assert (run / compat.TRAIN_SNAPSHOT_FILE).read_text() == '{"checkpoint_res' and (run / "checkpoint_1").is_dir()

    other = storage_path / "other"
    other.mkdir()
    (other / compat.TRAIN_SNAPSHOT_FILE).write_text("")
    lines: list[str] = []
    launch.repair_snapshot(str(storage_path), "other", log=lines.append)
    assert not (other / compat.TRAIN_SNAPSHOT_FILE).exists()
    assert len(lines) == 1 and lines[0].endswith("no checkpoint in storage, so the run starts afresh")


def test_finished_summary_answers_only_for_the_same_fingerprint_and_latest_checkpoint(tmp_path):
    run = tmp_path / "run"
    _snapshot(run, ["checkpoint_1", "checkpoint_2"])
    summary_path = tmp_path / "summary.json"
    summary_path.write_text(json.dumps({"status": "finished", "checkpoint": f"{run}/checkpoint_2", "steps": 4}))
    previous = {"fingerprint": "abc", "finished": {"summary": str(summary_path), "checkpoint": f"{run}/checkpoint_2"}}

    def identity(fingerprint="abc", fresh=False, record=previous):
        return launch.RunIdentity(str(run), fingerprint, {}, fresh, record)

    assert launch._finished_summary(identity())["steps"] == 4
    assert launch._finished_summary(identity(fingerprint="other")) is None
    assert launch._finished_summary(identity(fresh=True)) is None
    assert launch._finished_summary(identity(record={"fingerprint": "abc"})) is None  # started, never finished
    _snapshot(run, ["checkpoint_1"])  # its final checkpoint was set aside as bad
    assert launch._finished_summary(identity()) is None


def test_record_identity_then_finished_mark_in_the_run_storage(tmp_path):
    config = _config(tmp_path)
    identity = launch._check_identity(config, restart=False, log=print)
    launch._record_identity(config, identity, "sqlite:////tmp/mlruns.db", "run-1")
    record = json.loads((Path(identity.uri) / IDENTITY_FILE).read_text())
    assert (record["run_name"], record["fingerprint"], record["mlflow_run_id"]) == ("unit", identity.fingerprint,
                                                                                     "run-1")
    assert record["tracking_uri"] == "sqlite:////tmp/mlruns.db" and record["created"] == record["updated"]
    launch._record_finished(identity, {"steps": 3, "total_steps": 3, "summary_path": "/s.json", "checkpoint": "c"})
    record = json.loads((Path(identity.uri) / IDENTITY_FILE).read_text())
    assert record["finished"] == {"steps": 3, "total_steps": 3, "summary": "/s.json", "checkpoint": "c"}
    assert record["mlflow_run_id"] == "run-1"


def test_logged_note_says_what_a_resumed_run_holds():
    path = Path("/tmp/p.jsonl")
    assert launch._logged_note(-1, -1, [], True, path) == ""
    assert launch._logged_note(7, 7, [3, 7], True, path) == " (steps up to 7 in MLflow)"
    assert launch._logged_note(9, 4, [5, 6, 9], True, path) == \
        " (steps up to 4 in MLflow, 5–9 pending on disk (/tmp/p.jsonl), sent now)"
    assert launch._logged_note(-1, -1, [2], False, path) == \
        " (no steps in MLflow, 2 pending on disk (/tmp/p.jsonl), sent when the store answers)"


def test_apply_worker_env_keeps_a_users_own_values(tmp_path, monkeypatch):
    config = _config(tmp_path, ray={"health_check_interval_s": 0.5})
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv(launch.HEALTH_CHECK_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    env = launch.apply_worker_env(config)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE" and os.environ[launch.HEALTH_CHECK_ENV] == "0.5"
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"


def test_export_policy_copies_the_checkpoints_policy_folder(tmp_path):
    assert launch.export_policy(None, tmp_path / "dest") is None
    ckpt = tmp_path / "checkpoint_1"
    ckpt.mkdir()
    assert launch.export_policy(Checkpoint(str(ckpt)), tmp_path / "dest") is None  # no exported policy in it
    (ckpt / "policy").mkdir()
    (ckpt / "policy" / "model.safetensors").write_bytes(b"ok")
    dest = tmp_path / "out" / "policy"
    dest.mkdir(parents=True)
    (dest / "stale.bin").write_bytes(b"old")
    assert launch.export_policy(Checkpoint(str(ckpt)), dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors"]


def test_read_json_gives_a_dict_or_none(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": 1}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "cut.json").write_text('{"a": ')
    assert launch._read_json(str(tmp_path / "ok.json")) == {"a": 1}
    assert [launch._read_json(str(tmp_path / name)) for name in ("list.json", "cut.json", "missing.json")] == [
        None, None, None]
