"""The sweep's trial journal: what a killed driver must not forget, written per trial event, not per sweep.

Tune saves its whole experiment state (every trial's JSON and a pickle of the Optuna study) at once; doing
that after every event costs time proportional to the trials so far, so a sweep of N trials pays O(N²).
The sweep saves that state on a period instead (``sweep.experiment_checkpoint_s``) and keeps this journal
beside it: ``{experiment}/trial_journal/{trial_id}.json``, rewritten when its trial starts, saves a
checkpoint and ends — Tune's own record of that one trial (``trial_data``: what the experiment state
would hold) with its status, parameters and last result. A finished trial's folder (``result.json``
and the rest) is copied to storage when it ends, so it does not wait for the next full save.

`reconcile` runs before `Tuner.restore`: the newest experiment state gets the journal's newer records
(a trial the snapshot shows running or pending but the journal shows ended is ended, with its final
result; one started after the snapshot is added and resumes from its latest checkpoint), and the
searcher's saved state is made to agree with that trial list — the number of trials created, the
concurrency limiter's live trials, and the Optuna study (ended trials told, trials it never saw
registered, suggestions no trial carries failed). So a resumed sweep runs exactly ``num_samples`` trials
and never re-runs a finished one, whenever the driver was killed.

Those saved states are private layouts of Tune and Optuna; every read and edit of them goes through
`alphadpo_ray.compat`. An Optuna ``JournalStorage`` behind `OptunaSearch(storage=...)` would keep the
study itself durable, but not Tune's half: the trial id → Optuna trial map and the ended set live in the
searcher's pickle, the trial counter and the concurrency limiter in Tune's generator state, and a
journal file needs a POSIX file system where sweeps may store to an object store.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import time
import uuid

import pyarrow.fs as pafs
from ray.tune import Callback

from .. import compat
from ..services import storage

JOURNAL_DIR = "trial_journal"
ENDED = ("TERMINATED", "ERROR")


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write whole: through a temporary name on a local disk (an object store's put is whole already)."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as handle:
        return handle.read()


def _json_safe(value):
    return json.loads(json.dumps(value, default=str))


class TrialJournal(Callback):
    """Records each trial in the journal when it starts, checkpoints and ends (first in the callback
    list, so a trial is journaled before anything else learns it ended). Stateless: the trial's storage
    context says where, also after `Tuner.restore` moved the experiment."""

    def _record(self, trial, status: str) -> None:
        state, metadata = trial.get_json_state()
        state = json.loads(state)
        state["status"] = status
        entry = {"trial_id": trial.trial_id, "status": status, "time": time.time(),
                 "params": _json_safe(trial.config), "result": _json_safe(trial.last_result or {}),
                 "trial_data": [json.dumps(state), metadata]}
        fs, experiment = trial.storage.storage_filesystem, trial.storage.experiment_fs_path
        folder = posixpath.join(experiment, JOURNAL_DIR)
        if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders to make
            fs.create_dir(folder, recursive=True)
        _write(fs, posixpath.join(folder, f"{trial.trial_id}.json"), json.dumps(entry).encode())

    @staticmethod
    def _persist_folder(trial) -> None:
        """The ended trial's driver-side folder (result.json, progress.csv, params) to storage now."""
        try:
            pafs.copy_files(trial.local_path, trial.path, destination_filesystem=trial.storage.storage_filesystem,
                            use_threads=False)
        except (OSError, FileNotFoundError):
            pass  # nothing written yet: the next full save copies what there is

    def on_trial_start(self, iteration, trials, trial, **info):
        self._record(trial, "RUNNING")

    def on_trial_save(self, iteration, trials, trial, **info):
        if trial.status not in ENDED:
            self._record(trial, "RUNNING")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, "TERMINATED")  # Tune sets the status just after its callbacks
        self._persist_folder(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "ERROR")
        self._persist_folder(trial)


def read_journal(fs: pafs.FileSystem, experiment: str) -> dict[str, dict]:
    """trial id → its latest journal record (none if the experiment has no journal)."""
    infos = fs.get_file_info(pafs.FileSelector(posixpath.join(experiment, JOURNAL_DIR), allow_not_found=True))
    entries = {}
    for info in infos:
        if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
            try:
                entry = json.loads(_read(fs, info.path))
            except (OSError, ValueError):
                continue  # being replaced while the driver died: the snapshot's record stands
            entries[entry["trial_id"]] = entry
    return entries


def _newest(fs: pafs.FileSystem, experiment: str, pattern: str) -> str | None:
    """The file Tune restores from: the greatest name matching `pattern` at the experiment's top."""
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(experiment, allow_not_found=True))
             if i.type == pafs.FileType.File]
    matching = fnmatch.filter(names, pattern)
    return posixpath.join(experiment, max(matching)) if matching else None


def merge_trials(trial_data: list, journal: dict[str, dict], add: set[str]) -> tuple[list, list[dict]]:
    """The snapshot's ``trial_data`` with the journal's newer records: a record replaces the snapshot's
    entry unless the snapshot has that trial ended; trials in `add` the snapshot lacks are appended (by
    time). Returns the merged list and the journal records that ended a trial the snapshot had not."""
    merged, ended, seen = [], [], set()
    for entry in trial_data:
        trial_id, status = (json.loads(entry[0])[k] for k in ("trial_id", "status"))
        seen.add(trial_id)
        record = journal.get(trial_id)
        if record is None or status in ENDED:
            merged.append(entry)
            continue
        merged.append(record["trial_data"])
        if record["status"] in ENDED:
            ended.append(record)
    for trial_id, record in sorted(journal.items(), key=lambda item: item[1]["time"]):
        if trial_id not in seen and trial_id in add:
            merged.append(record["trial_data"])
            if record["status"] in ENDED:
                ended.append(record)
    return merged, ended


def _register(searcher, trial_id: str, params: dict) -> None:
    """A running Optuna trial for a Tune trial the study never saw (suggested after its snapshot): the
    starting point Tune had handed out if it is next in the study's queue, else one with these params."""
    from optuna.trial import TrialState, create_trial

    study, space, ot_trials, _completed = compat.optuna_search_parts(searcher)
    params = {k: params[k] for k in space if k in params}
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if waiting and compat.enqueued_params(waiting[0]) == params:
        ot_trials[trial_id] = study.ask(fixed_distributions=space)
        return
    study.add_trial(create_trial(state=TrialState.RUNNING, params=params, distributions=space))
    ot_trials[trial_id] = compat.optuna_trial_handle(study, study.get_trials(deepcopy=False)[-1])


def reconcile_searcher(searcher, trials: dict[str, tuple[str, dict, dict]]) -> None:
    """Make a restored `OptunaSearch` agree with Tune's trial list (trial id → status, params, last
    result): every trial known, ended ones told (through the searcher, so its own rules for failed and
    NaN results hold), and suggestions no trial carries failed."""
    from optuna.trial import TrialState
    from ray.tune.utils import flatten_dict

    study, _space, ot_trials, completed = compat.optuna_search_parts(searcher)
    for trial_id, (status, params, result) in trials.items():
        if trial_id in completed:
            continue
        if trial_id not in ot_trials:
            _register(searcher, trial_id, params)
        if status in ENDED:
            searcher.on_trial_complete(trial_id, result=flatten_dict(result) or None, error=status == "ERROR")
    for trial_id in [t for t in ot_trials if t not in trials and t not in completed]:
        study.tell(ot_trials[trial_id], state=TrialState.FAIL)
        completed.add(trial_id)


def reconcile(experiment_uri: str, make_searcher=None) -> list[dict]:
    """Before `Tuner.restore`: fold the journal into the newest experiment state and make the searcher's
    saved state agree (see the module docstring). `make_searcher` builds an empty searcher of the sweep's
    kind to load the saved one into (None for a grid sweep, whose trials Tune generates in a fixed order
    from its saved variant generator: trials started after the snapshot are added and the generator is
    advanced past them, `compat.skip_generated_variants`). Without a journal (a sweep from before it) the
    searcher's state is still made to agree with the snapshot's trials: Tune saves and uploads those
    files one by one, so a kill can leave them from different saves. Returns the journal records that
    ended trials the snapshot had not (their MLflow runs may still need closing)."""
    fs, experiment = storage.resolve(experiment_uri)
    journal = read_journal(fs, experiment)
    patterns = compat.tune_state_patterns()
    state_path = _newest(fs, experiment, patterns["experiment"])
    if state_path is None:
        return []  # nothing Tune could restore
    state = json.loads(_read(fs, state_path))
    after_snapshot = set(journal) - {json.loads(entry[0])["trial_id"] for entry in state["trial_data"]}
    variant_path = _newest(fs, experiment, patterns["variants"])
    variants = _read(fs, variant_path) if variant_path is not None else None
    add = after_snapshot if make_searcher is not None else set()
    if variants is not None and after_snapshot:  # a grid: its generator must not create those trials again
        advanced = compat.skip_generated_variants(variants, after_snapshot)
        if advanced is not None:
            variants, add = advanced
    state["trial_data"], ended = merge_trials(state["trial_data"], journal, add)
    if journal:
        _write(fs, state_path, json.dumps(state).encode())

    trials = {}
    for entry in state["trial_data"]:
        data = json.loads(entry[0])
        record = journal.get(data["trial_id"], {})
        metadata = json.loads(entry[1]) if isinstance(entry[1], str) else {}
        trials[data["trial_id"]] = (data["status"], record.get("params") or {},
                                    record.get("result") or metadata.get("last_result") or {})
    live = {t for t, (status, *_rest) in trials.items() if status not in ENDED}
    if variants is not None:  # a grid: its generator holds back trials while `max_concurrent` live
        edited = compat.edit_variant_generator_state(variants, live)
        if edited is not None:
            _write(fs, variant_path, edited)
    gen_path = _newest(fs, experiment, patterns["search_gen"])
    if gen_path is not None and make_searcher is not None:
        # trials created = trials Tune holds: no more, no fewer
        _write(fs, gen_path, compat.edit_search_generator_state(_read(fs, gen_path), len(trials), live))
    searcher_path = _newest(fs, experiment, patterns["searcher"])
    if searcher_path is not None and make_searcher is not None:
        searcher = make_searcher()
        compat.load_optuna_searcher(searcher, _read(fs, searcher_path))  # as OptunaSearch.restore does
        reconcile_searcher(searcher, trials)
        _write(fs, searcher_path, compat.dump_optuna_searcher(searcher))  # as OptunaSearch.save does
    return ended
