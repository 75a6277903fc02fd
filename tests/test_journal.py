"""Unit tests of `sweep/journal.py` on files: reading the trial journal (a record being replaced when the
driver died is skipped), the newest of Tune's saved states, and `reconcile` folding the journal into the
newest experiment state on disk (grid sweeps: no searcher). `merge_trials` and `reconcile_searcher` on
their own are tested in test_sweep.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs

from alphadpo_ray.sweep import journal
from alphadpo_ray.sweep.journal import JOURNAL_DIR, read_journal, reconcile

LOCAL = pafs.LocalFileSystem()


def _data(trial_id: str, status: str, **extra) -> list:
    return [json.dumps({"trial_id": trial_id, "status": status, **extra}), json.dumps({"last_result": {}})]


def _record(trial_id: str, status: str, t: float, **result) -> dict:
    return {"trial_id": trial_id, "status": status, "time": t, "params": {"beta": 0.1},
            "result": result, "trial_data": _data(trial_id, status, source="journal")}


def _journal(experiment: Path, *records: dict) -> None:
    folder = experiment / JOURNAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        (folder / f"{record['trial_id']}.json").write_text(json.dumps(record))


def test_read_journal_returns_the_latest_record_per_trial_and_skips_unreadable_ones(tmp_path):
    assert read_journal(LOCAL, str(tmp_path)) == {}  # no journal: a sweep from before it
    _journal(tmp_path, _record("t1", "RUNNING", 1.0), _record("t2", "TERMINATED", 2.0, acc=0.5))
    (tmp_path / JOURNAL_DIR / "t3.json").write_text('{"trial_id": "t3", "sta')  # cut short by a kill
    (tmp_path / JOURNAL_DIR / "t4.json.tmp-1a2b3c4d").write_text(json.dumps(_record("t4", "RUNNING", 3.0)))
    (tmp_path / JOURNAL_DIR / "folder.json").mkdir()
    entries = read_journal(LOCAL, str(tmp_path))
    assert sorted(entries) == ["t1", "t2"]
    assert entries["t2"]["status"] == "TERMINATED" and entries["t2"]["result"] == {"acc": 0.5}


def test_newest_is_the_greatest_matching_file_at_the_top(tmp_path):
    assert journal._newest(LOCAL, str(tmp_path / "missing"), "experiment_state-*.json") is None
    for name in ("experiment_state-2024-01-01_00-00-00.json", "experiment_state-2024-03-01_00-00-00.json",
                 "search_gen_state-2024-09-01_00-00-00.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "experiment_state-2099-folder.json").mkdir()  # not a file
    assert journal._newest(LOCAL, str(tmp_path), "experiment_state-*.json") == \
        f"{tmp_path}/experiment_state-2024-03-01_00-00-00.json"
    assert journal._newest(LOCAL, str(tmp_path), "searcher-state-*.pkl") is None


def test_write_replaces_a_local_file_whole_without_leaving_a_temporary_one(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    journal._write(LOCAL, str(target), b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def _states(experiment: Path) -> tuple[Path, Path]:
    old, new = (experiment / "experiment_state-2024-01-01_00-00-00.json",
                experiment / "experiment_state-2024-01-02_00-00-00.json")
    old.write_text(json.dumps({"trial_data": [_data("a", "RUNNING")], "runner_data": {"old": 1}}))
    new.write_text(json.dumps({"trial_data": [_data("a", "TERMINATED"), _data("b", "RUNNING")],
                               "runner_data": {"kept": True}}))
    return old, new


def test_reconcile_without_a_saved_state_does_nothing(tmp_path):
    _journal(tmp_path, _record("a", "TERMINATED", 1.0))
    assert reconcile(str(tmp_path)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_DIR]


def test_reconcile_without_a_variant_generator_updates_the_newest_state_and_adds_nothing(tmp_path):
    old, new = _states(tmp_path)
    old_text = old.read_text()
    ended_b = _record("b", "TERMINATED", 5.0, acc=0.9)
    _journal(tmp_path, _record("a", "RUNNING", 1.0), ended_b, _record("c", "TERMINATED", 6.0))
    ended = reconcile(str(tmp_path), make_searcher=None)
    assert ended == [ended_b]  # b ended after the snapshot; a's ended snapshot record stands; c is not added
    # (no saved variant generator to advance past c: Tune would generate it again)
    state = json.loads(new.read_text())
    assert [json.loads(entry[0]) for entry in state["trial_data"]] == [
        {"trial_id": "a", "status": "TERMINATED"}, {"trial_id": "b", "status": "TERMINATED", "source": "journal"}]
    assert state["runner_data"] == {"kept": True} and old.read_text() == old_text  # only the newest is edited


def test_reconcile_adds_trials_started_after_the_snapshot(tmp_path):
    _old, new = _states(tmp_path)
    _journal(tmp_path, _record("d", "RUNNING", 7.0), _record("c", "TERMINATED", 6.0))
    ended = reconcile(str(tmp_path), make_searcher=lambda: None)  # a searcher sweep (no searcher state saved)
    assert [r["trial_id"] for r in ended] == ["c"]
    statuses = [(json.loads(e[0])["trial_id"], json.loads(e[0])["status"]) for e in
                json.loads(new.read_text())["trial_data"]]
    assert statuses == [("a", "TERMINATED"), ("b", "RUNNING"), ("c", "TERMINATED"), ("d", "RUNNING")]  # by time


def test_reconcile_without_a_journal_leaves_the_state_file_as_it_was(tmp_path):
    _old, new = _states(tmp_path)
    before = new.read_bytes()
    assert reconcile(str(tmp_path), make_searcher=None) == []
    assert new.read_bytes() == before


def test_reconcile_of_a_grid_adds_the_trials_started_after_the_snapshot_and_never_generates_them_again(tmp_path):
    """A grid sweep saves Tune's state every 30 s like any other: trials the dead driver created after the
    last save are in the journal only. They are added, and the saved variant generator is advanced past
    them, so the restored sweep goes on with the next grid point (was: every controller step saved the
    whole state, quadratic in the grid's size)."""
    import fnmatch

    from ray import tune
    from ray.tune.experiment import Experiment
    from ray.tune.search import BasicVariantGenerator

    from alphadpo_ray import compat

    tune.register_trainable("journal_grid", lambda config: None)
    grid = BasicVariantGenerator(max_concurrent=2)
    grid.add_configurations([Experiment("g", "journal_grid", config={
        "a": tune.grid_search([1, 2, 3]), "b": tune.grid_search([10, 20])})])
    first = [grid.next_trial() for _ in range(2)]
    grid.save_to_dir(str(tmp_path), "2024-01-01_00-00-00")  # the last full save: 2 trials generated, live
    later = []  # created by the driver after it, each when a slot freed, then the driver died
    for done in (first[0], None):
        grid.on_trial_complete(done.trial_id if done else later[0].trial_id)
        later.append(grid.next_trial())
    (tmp_path / "experiment_state-2024-01-01_00-00-00.json").write_text(json.dumps(
        {"trial_data": [_data(t.trial_id, "RUNNING") for t in first], "runner_data": {}}))
    _journal(tmp_path, _record(first[0].trial_id, "TERMINATED", 1.0), _record(later[0].trial_id, "TERMINATED", 2.0),
             _record(later[1].trial_id, "RUNNING", 3.0))

    ended = reconcile(str(tmp_path), make_searcher=None)
    assert [r["trial_id"] for r in ended] == [first[0].trial_id, later[0].trial_id]
    state = json.loads((tmp_path / "experiment_state-2024-01-01_00-00-00.json").read_text())
    assert [json.loads(e[0])["trial_id"] for e in state["trial_data"]] == [t.trial_id for t in first + later]
    restored = BasicVariantGenerator(max_concurrent=2)
    restored.restore_from_dir(str(tmp_path))
    assert restored._live_trials == {first[1].trial_id, later[1].trial_id}  # what Tune restores as running
    restored.on_trial_complete(first[1].trial_id)
    nxt = restored.next_trial()
    grid.on_trial_complete(first[1].trial_id)
    expected = grid.next_trial()  # what the dead driver would have generated next
    assert (nxt.trial_id, nxt.config) == (expected.trial_id, expected.config) == (f"{grid._uuid_prefix}00004",
                                                                                  {"a": 2, "b": 20})
    assert [n for n in (p.name for p in tmp_path.iterdir()) if fnmatch.fnmatch(n, "*.tmp-*")] == []
    assert compat.skip_generated_variants(b"\x80\x04}\x94.", {"x"}) is None  # not a generator's state
