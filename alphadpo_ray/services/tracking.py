"""MLflow tracking: one run per training run, logged by a single writer.

* The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``, else an embedded SQLite store
  ``mlflow.db`` in the working directory — the store `mlflow ui` opens there by default.
* `check_tracking` runs before anything expensive: an unreachable server fails the run at once with
  a clear message instead of training for hours untracked; a SQLite store is created once, by the
  driver, before any other process touches it.
* The resolved config is logged as params with its secrets masked (`secrets.mask_secrets`); every
  message that shows a URI is redacted (`secrets.redact`).
* Per-step metrics are logged by `train_callbacks.MLflowMetricsCallback`, a Ray Train `UserCallback`: it
  runs in the Train controller (one process) and sees every report, so several workers never write at once.
  It appends each report to the run's pending file; the driver, on the same node, sends that file while
  the run trains (`MetricsSender`), so the controller never imports MLflow.
* A run is keyed by (storage path, run name): re-running a stopped run resumes the same MLflow run
  and logs only the steps after those it already holds; a fresh start gets a new MLflow run.
* A tracking outage never stops training: reports go through an on-disk `PendingMetrics` file and
  are sent when the store answers again, at the end of the run, or at its next start.
* An embedded SQLite store is created under a file lock (`create_sqlite_store`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .. import compat
from ..errors import AlphaDPOError
from .secrets import mask_secrets, redact
from .storage import default_cache_dir, file_lock

RUN_KEY_TAG = "alphadpo.run_key"
# MLflow 3's experiment type: "custom_model_development" is the "Machine learning" (runs table) kind, as
# opposed to "genai_development" (traces). MLflow 3.17's UI shows the view of its global "GenAI / Model
# training" switch (the URL's ``workflowType``, else the browser's last choice, GenAI by default), so the
# links printed here carry ``workflowType=machine_learning`` too (`experiment_url`).
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI (Markdown)


class TrackingUnavailable(AlphaDPOError):
    """The MLflow tracking server cannot be reached."""


def resolve_tracking_uri(configured: str | None = None) -> str:
    """The tracking URI to use, never with credentials in it.

    An http(s) URI may carry them (``https://user:password@host``, as `MlflowClient` accepts); they
    are moved to ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` in this process's
    environment and the URI without them is returned. Process-wide on purpose: MLflow reads these
    variables in whichever process logs (this driver, Tune's callbacks, and the Train controller of
    a Ray started from here, which inherits this environment), while the URI itself is printed,
    written into summaries and pickled with callbacks into Tune's experiment state. On an existing
    cluster, set the two variables on its nodes (they are never put into a Ray ``runtime_env``)."""
    quiet_run_links()
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        address, credentials = _url_credentials(uri)
        if credentials is not None:
            os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = credentials
            return address
    return uri


def create_sqlite_store(uri: str) -> None:
    """Create (and migrate) an embedded ``sqlite:///`` store under a file lock beside it.

    MLflow creates a fresh store's tables with Alembic migrations; two processes doing that at once
    on the same file leave it broken for good (``table _alembic_tmp_experiments already exists``).
    Here the first process creates it while the others wait on ``{db}.lock``, then find it made.
    An unwritable directory fails at once, naming the store. Other URIs are left alone."""
    if not uri.startswith("sqlite:///"):
        return
    from mlflow.tracking import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    try:
        with file_lock(db.with_name(db.name + ".lock")):
            if not db.exists():
                _copy_template_store(db)
            MlflowClient(uri).search_experiments(max_results=1)  # creates/migrates the store, once
    except OSError as err:
        raise TrackingUnavailable(
            f"cannot create the MLflow store {db}: {err.strerror or err} (set tracking.tracking_uri / "
            "MLFLOW_TRACKING_URI to a writable place, or tracking.enabled=false)") from None


def _copy_template_store(db: Path) -> None:
    """Start a new SQLite store as a copy of an empty one this MLflow version made and migrated before
    (``{cache}/mlflow-sqlite/{version}.db``, made once per machine and version): MLflow builds a store
    through its ~50 Alembic migrations, 3-9 s per new store on a CPU node, a tenth of a short run. The
    template holds no experiment: MLflow creates the Default one (its artifact location under the working
    directory) when the copy is first opened, as for a store it made itself. The copy is linked into place
    only where no file is: an existing one, even empty, may be open in another process."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    template = default_cache_dir() / "mlflow-sqlite" / f"{mlflow.__version__}.db"
    template.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(template.with_name(template.name + ".lock")):
        if not template.exists():
            making = template.with_name(f".{template.name}.{os.getpid()}")
            MlflowClient(f"sqlite:///{making}").search_experiments(max_results=1)  # create + migrate
            compat.drop_default_experiment(making)  # delete + `mlflow gc`: the template holds no experiment
            os.replace(making, template)
    copy = db.with_name(f".{db.name}.{os.getpid()}")
    shutil.copyfile(template, copy)
    try:  # never replaces a file: a process outside the lock (an `mlflow ui`) may have just opened one
        os.link(copy, db)
    except OSError:  # it exists now, or no hard links here: MLflow creates or migrates it as usual
        pass
    finally:
        copy.unlink()


def server_reachable(uri: str, timeout: float = 2.0) -> bool:
    """Whether an http(s) tracking server answers ``/health`` within `timeout` (other stores: True).

    Probed before every send while a run trains, so an outage costs one short probe instead of the
    MLflow client's own retries (minutes of back-off that would stall the Train controller). Any HTTP
    answer counts: the server is there."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(_url_credentials(uri)[0].rstrip("/") + "/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_tracking(uri: str, timeout: float = 10.0) -> None:
    """Fail fast if the tracking store is unusable (server down, unwritable path).

    A server URI may carry credentials (``https://user:password@host``, as `MlflowClient` accepts):
    the probe sends them as HTTP basic auth (else ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` or
    ``MLFLOW_TRACKING_TOKEN`` from the environment), and every message shows the URI redacted."""
    if uri.startswith(("http://", "https://")):
        import base64

        address, credentials = _url_credentials(uri)
        request = urllib.request.Request(address.rstrip("/") + "/health")
        if credentials is None and os.environ.get("MLFLOW_TRACKING_USERNAME"):
            credentials = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        if credentials is not None:
            basic = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {basic}")
        elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
            request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if response.status != 200:
                    raise TrackingUnavailable(f"MLflow server at {redact(uri)} answered {response.status} on /health")
        except urllib.error.HTTPError as err:
            raise TrackingUnavailable(f"MLflow server at {redact(uri)} answered {err.code} ({err.reason}) on /health; "
                                      "check its address and credentials") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise TrackingUnavailable(
                f"MLflow tracking server {redact(uri)} is unreachable "
                f"({redact(str(getattr(err, 'reason', err)))}). Start it "
                "(`mlflow server --host 127.0.0.1 --port 5000`), fix tracking.tracking_uri / MLFLOW_TRACKING_URI, "
                "or set tracking.enabled=false; nothing was trained."
            ) from None
        _check_server_credentials(uri, request, timeout)
        return
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if not uri.startswith("sqlite:") and "://" in uri and not uri.startswith("file:"):
        _check_database(uri, timeout)
    try:
        MlflowClient(uri).search_experiments(max_results=1)  # creates/migrates the store here, once
    except Exception as err:  # noqa: BLE001
        raise TrackingUnavailable(f"MLflow tracking store {redact(uri)} is not usable: {redact(str(err))}") from None


def _check_database(uri: str, timeout: float) -> None:
    """One connection to a database store (PostgreSQL, MySQL, ...) with a connect timeout, before MLflow
    opens it: MLflow retries an unreachable database with backoff for about 100 s, a warning each time."""
    import sqlalchemy

    connect_args = {"connect_timeout": max(1, int(timeout))} if uri.startswith(("postgresql", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
    except Exception:  # noqa: BLE001 - a URI SQLAlchemy can't take: MLflow's own open says why
        return
    try:
        with engine.connect():
            pass
    except Exception as err:  # noqa: BLE001
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise TrackingUnavailable(
            f"MLflow tracking store {redact(uri)} is unreachable ({redact(reason)}). Start the database, fix "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false; nothing was trained."
        ) from None
    finally:
        engine.dispose()


def _check_server_credentials(uri: str, health: urllib.request.Request, timeout: float) -> None:
    """An authenticating server (MLflow's basic-auth app, or a proxy) leaves ``/health`` open: one
    search with `health`'s credentials tells whether it accepts them, before anything starts."""
    address = health.full_url.removesuffix("/health")
    request = urllib.request.Request(f"{address}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers=dict(health.header_items()))
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code not in (401, 403):
            return  # not a question of credentials: the run's own calls will say what it is
        given = "the credentials given were refused" if request.has_header("Authorization") else "it needs credentials"
        raise TrackingUnavailable(
            f"MLflow server at {redact(uri)} answered {err.code} ({err.reason}): {given}. Set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account "
            "the server accepts; nothing was started.") from None
    except (urllib.error.URLError, OSError, ValueError):
        return  # it answered /health a moment ago; a passing failure is the outage handling's to ride out


def _url_credentials(uri: str) -> tuple[str, tuple[str, str] | None]:
    """(the URL without its userinfo, (user, password) or None)."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} → {'a.b': 1}; lists become JSON strings."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, (list, tuple)) else tree}




def config_params(config_dict: dict) -> dict[str, str]:
    return {k: str(v)[:6000] for k, v in flatten(mask_secrets(config_dict)).items()}


def run_key(storage_path: str, run_name: str) -> str:
    return hashlib.sha256(f"{storage_path}|{run_name}".encode()).hexdigest()[:16]


def _already_exists(err: BaseException) -> bool:
    """Whether creating an experiment failed because another process created it first: MLflow's
    ``RESOURCE_ALREADY_EXISTS`` (its REST server and SQL store), or a unique-constraint violation the
    SQL store lets through as another code (SQLAlchemy's `IntegrityError` at commit)."""
    seen = 0
    while err is not None and seen < 10:
        if getattr(err, "error_code", None) == "RESOURCE_ALREADY_EXISTS" or type(err).__name__ == "IntegrityError":
            return True
        text = str(err)
        if "UNIQUE constraint failed" in text or "duplicate key value" in text or "Duplicate entry" in text:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def get_or_create_experiment(client, name: str) -> str:
    """The id of experiment `name`, created if missing — the one place an experiment is created. Race-free:
    runs, sweeps and compares started together may all find it missing; whichever creates it first wins
    and the others, told it already exists, read it back."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:  # typed for model training as it is made (`mark_training_experiment` types older ones)
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    except Exception as err:  # noqa: BLE001 - narrowed by `_already_exists`
        if not _already_exists(err):
            raise
    experiment = client.get_experiment_by_name(name)
    if experiment is None:  # pragma: no cover - a store that refused a name it does not hold
        raise TrackingUnavailable(f"MLflow said experiment {name!r} already exists but does not return it")
    return experiment.experiment_id


def start_or_resume_run(uri: str, experiment: str, run_name: str, key: str, params: dict[str, str],
                        tags: dict[str, str] | None = None, *, resume: bool = True,
                        run_id: str | None = None) -> tuple[str, bool]:
    """(run_id, resumed) for the run keyed by `key` (storage path + name).

    ``resume``: continue `run_id` (the run recorded with the run's storage) when the store has it, or,
    with none recorded, the newest run tagged `key`. Not ``resume`` (a fresh start: nothing in storage
    to continue), or nothing to continue: a new run. Any other run tagged `key` still ``RUNNING`` (its
    driver was killed) is closed as ``KILLED``; finished runs are left as they are."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    mark_training_experiment(client, experiment_id)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                               order_by=["attributes.start_time DESC"], max_results=1000)
    chosen = None
    if resume:
        if run_id:
            chosen = next((r.info.run_id for r in found if r.info.run_id == run_id), None)
        elif found:
            chosen = found[0].info.run_id
    for run in found:
        if run.info.run_id != chosen and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
    if chosen:
        client.update_run(chosen, status="RUNNING")
        return chosen, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: key, **(tags or {})})
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    return run.info.run_id, False


SEARCH_PAGE = 1000  # runs per MLflow search page


def search_all_runs(client, experiment_ids: list[str], filter_string: str = "", order_by: list[str] | None = None):
    """Every run matching `filter_string`, page after page (MLflow returns at most one page, 1,000 here, per
    call: a single call with a large ``max_results`` silently stops at its cap)."""
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, order_by=order_by, max_results=SEARCH_PAGE,
                                  page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def last_logged_step(client, run_id: str, key: str = "train/loss") -> int:
    """The highest step logged for metric `key` in the run (-1 if none): a resumed run logs only
    later steps, so every step appears once in its history."""
    return max((m.step for m in client.get_metric_history(run_id, key)), default=-1)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def report_by_step(report: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(step, metrics) pairs of one recipe report, in step order. Every report carries the latest held-out
    evaluation along (``eval/*``, ``objective/*``: Tune's searchers and schedulers read them), but that
    evaluation belongs to step ``eval/step``: logged there, once, not as a new point at every report."""
    step, evaluated = int(report.get("step", 0)), report.get("eval/step")
    if evaluated is None or int(evaluated) == step:
        return [(step, report)]
    carried = ("eval/", "objective/")
    return [(int(evaluated), {k: v for k, v in report.items() if k.startswith(carried)}),
            (step, {k: v for k, v in report.items() if not k.startswith(carried)})]


def log_metrics(client, run_id: str, metrics: dict[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items() if k not in ("step", "total_steps")]
    for i in range(0, len(values), 500):
        client.log_batch(run_id, metrics=values[i : i + 500])


RETRY_S = 2.0  # how often a run's sender retries a store that did not answer
FINISH_WAIT_S = 60.0  # how long the end of a run waits for an unreachable store before leaving the rest on disk
_PERMANENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_STATE")  # retrying cannot help


def default_pending_path(run_id: str) -> Path:
    return Path(tempfile.gettempdir()) / "alphadpo-ray-mlflow" / f"{run_id}.jsonl"


NEW_RUN = "new-run:"  # a run key naming a run the pending file creates (`new_run_key`), not an MLflow run id


def new_run_key(experiment_id: str, identity: dict[str, str]) -> str:
    """The key under which a pending file's events name a run it has still to create: the experiment and
    the tags that identify the run there (``{tag: value}``), so a sender that did not see the run created
    (another process, after a crash) finds it by one search instead of creating it twice."""
    return NEW_RUN + json.dumps([experiment_id, identity], sort_keys=True)


class PendingMetrics:
    """What a run (or a sweep's runs) has for the tracking store and has not sent yet, on disk: one JSON line
    per report (``{"run_id", "step", "ts", "metrics"}``), end of run (``{"run_id", "finish": STATUS,
    "summary", "artifacts", "tags"}``) or creation of a run (``{"run_id": new_run_key(...), "create":
    {"run_name", "tags", "params", "data"}}``), in order. A run created here is named by its `new_run_key`
    in the events that follow; the sender resolves it (``resolved``: key → MLflow run id), so whoever
    appends never waits for the store, not even to create a run.

    Every report is written here first and sent from here, so a tracking outage never stops training
    and nothing is lost: what the store cannot take stays in the file until the store is back, the
    end of the run, or the next start of the run — whichever process flushes first (the driver's sender
    while the run trains, or the Train controller's for a Ray Client driver; the driver at the end; the
    next start). ``{path}.send-lock`` lets one sender at a time send, across processes; ``{path}.lock``
    is held only for reading, appending and rewriting the file, never across network calls, so a report
    is never held up by a slow store. A line is removed only once the store has it; steps the store
    already holds (a sender killed between sending and removing) are not sent twice.

    ``floors``: run id → the highest step the store already holds for it, read from the store before a
    run's first send unless known (a run this process created holds nothing: -1, no read). A creation this
    process appended is sent as is; one found in the file from an earlier process is first looked for in
    the store (that process may have created the run and died before removing the line)."""

    def __init__(self, uri: str, path: str | Path):
        self.uri, self.path = uri, Path(path)
        self.error = ""
        self.floors: dict[str, int] = {}
        self.resolved: dict[str, str] = {}  # new_run_key → the MLflow run id it was created as (or found)
        self._appended: set[str] = set()  # new_run_keys whose creation this process appended

    def _lock(self, suffix: str = ".lock"):
        return file_lock(self.path.with_name(self.path.name + suffix))

    def add(self, event: dict) -> None:
        if "create" in event:
            self._appended.add(event["run_id"])
        with self._lock(), open(self.path, "a") as handle:
            handle.write(json.dumps(event, default=str) + "\n")

    def run_id(self, key: str) -> str | None:
        """The MLflow run id of a run key: itself, or what a `new_run_key` was created as (None: not yet)."""
        return self.resolved.get(key) if key.startswith(NEW_RUN) else key

    def events(self) -> list[dict]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut off by a killed writer
                continue
        return out

    def flush(self) -> bool:
        """Send everything pending, in order; True when nothing is left. Never raises: on a failure
        the rest stays on disk and `error` says why."""
        from mlflow.exceptions import MlflowException

        try:
            with self._lock(".send-lock"):
                with self._lock():
                    events = self.events()
                if not events:
                    return True
                if not server_reachable(self.uri):
                    self.error = f"{redact(self.uri)} does not answer"
                    return False
                done: set[int] = set()
                try:
                    from mlflow.tracking import MlflowClient

                    client = MlflowClient(self.uri)
                    for batch in self._batches(events):
                        try:
                            self._send(client, [events[i] for i in batch])
                        except MlflowException as err:
                            if err.error_code not in _PERMANENT:
                                raise
                            self.error = redact(f"dropped {len(batch)} event(s) the store refuses: {err}")[:500]
                        done.update(batch)
                except Exception as err:  # noqa: BLE001 - an outage or anything else: keep the rest, retry later
                    self.error = redact(f"{type(err).__name__}: {err}")[:500]
                finally:
                    with self._lock():  # reports appended meanwhile follow the ones read above
                        now = self.events()
                        self._keep([e for i, e in enumerate(events) if i not in done] + now[len(events):])
                return len(done) == len(events)
        except OSError as err:
            self.error = f"cannot use {self.path}: {err}"
            return False

    def _keep(self, rest: list[dict]) -> None:
        if not rest:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in rest))
        os.replace(tmp, self.path)

    @staticmethod
    def _batches(events: list[dict]) -> list[list[int]]:
        """The events' indices in send order, grouped by run: each run's events keep their order, its
        consecutive reports go in one batch up to MLflow's 1000 metrics per batch (at least one report),
        a creation or an end of run alone, after the events before it. Interleaved reports of many runs (a sweep's
        trials) so cost one `log_batch` per run, not one per report."""
        by_run: dict[str, list[int]] = {}
        for i, event in enumerate(events):
            by_run.setdefault(event["run_id"], []).append(i)
        batches: list[list[int]] = []
        for indices in by_run.values():
            batch, count = [], 0
            for i in indices:
                size = len(events[i].get("metrics") or ())
                alone = "finish" in events[i] or "create" in events[i]
                if batch and (alone or count + size > 1000):
                    batches.append(batch)
                    batch, count = [], 0
                if alone:
                    batches.append([i])
                    continue
                batch.append(i)
                count += size
            if batch:
                batches.append(batch)
        return batches

    def _send(self, client, batch: list[dict]) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.exceptions import MlflowException

        if "create" in batch[0]:
            self._create(client, batch[0]["run_id"], batch[0]["create"])
            return
        key = batch[0]["run_id"]
        run_id = self._find(client, key) if key.startswith(NEW_RUN) else key
        if run_id is None:  # its creation was lost with the file of an earlier process: nowhere to send these
            raise MlflowException(f"no run was created for {key}", error_code="RESOURCE_DOES_NOT_EXIST")
        if "finish" in batch[0]:
            event = batch[0]
            if event.get("tags"):
                client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in event["tags"].items()])
            if event.get("summary") is not None:
                client.log_dict(run_id, event["summary"], "summary.json")
            for path in event.get("artifacts") or []:
                if Path(path).exists():
                    client.log_artifact(run_id, str(path))
            close_run(client, run_id, event["finish"])
            return
        if run_id not in self.floors:
            self.floors[run_id] = last_logged_step(client, run_id)
        floor, metrics = self.floors[run_id], []
        for event in batch:  # a step at or below one already held or sent (a replay appended again) is skipped
            if int(event["step"]) > floor:
                floor = int(event["step"])
                metrics += [Metric(k, float(v), int(event["ts"]), floor) for k, v in event["metrics"].items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        self.floors[run_id] = floor

    def _find(self, client, key: str) -> str | None:
        """The run a `new_run_key` names, looked up in the store (newest first); None if it is not there."""
        if key in self.resolved:
            return self.resolved[key]
        experiment_id, identity = json.loads(key[len(NEW_RUN):])
        found = client.search_runs([experiment_id], " and ".join(f"tags.`{k}` = '{v}'" for k, v in identity.items()),
                                   max_results=1)
        if found:
            self.resolved[key] = found[0].info.run_id
        return self.resolved.get(key)

    def _create(self, client, key: str, spec: dict) -> None:
        """Create the run a `new_run_key` names, with its tags, params and data inputs, once: a creation
        appended by an earlier process, or one cut short here, may have happened already (then its params
        and inputs are completed, both idempotent)."""
        from mlflow.entities import Param

        run_id = self.resolved.get(key)
        if run_id is None and key not in self._appended:
            run_id = self._find(client, key)
        new = run_id is None
        if new:
            experiment_id, identity = json.loads(key[len(NEW_RUN):])
            run_id = client.create_run(experiment_id, run_name=spec.get("run_name"),
                                       tags={**identity, **(spec.get("tags") or {})}).info.run_id
            self.resolved[key] = run_id  # before anything else can fail: a retry completes it, never creates again
            self.floors[run_id] = -1  # nothing to read back
        items = sorted((spec.get("params") or {}).items())
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in items[i : i + 100]])
        if spec.get("data"):
            log_data_inputs(client, run_id, spec["data"], new_run=new)


class MetricsSender:
    """A daemon thread that flushes a `PendingMetrics` file when an event arrives, and every `every_s`
    seconds (another process appending to the file: the Train controller of a run this process drives),
    retrying a store that does not answer; each outage is reported once on the console (``going_on``:
    what goes on meanwhile, ``training`` or ``the sweep``). Whoever appends never waits on the network.
    `stop` ends the thread after its current flush (what is left stays in the file)."""

    def __init__(self, pending: PendingMetrics, going_on: str = "training", every_s: float = RETRY_S):
        self.pending, self.going_on, self.every_s = pending, going_on, every_s
        self.wake, self.stopped, self.down = threading.Event(), threading.Event(), False
        self.thread = threading.Thread(target=self._loop, name="alphadpo-mlflow-sender", daemon=True)
        self.thread.start()

    def add(self, event: dict) -> None:
        self.pending.add(event)
        self.wake.set()

    def stop(self, timeout: float | None = None) -> None:
        self.stopped.set()
        self.wake.set()
        self.thread.join(timeout)

    def _loop(self) -> None:
        while not self.stopped.is_set():
            self.wake.wait(self.every_s)
            self.wake.clear()
            if self.stopped.is_set():
                return
            ok = self.pending.flush()
            if not ok and not self.down:
                self.down = True
                print(f"[mlflow] tracking store unavailable ({self.pending.error}); {self.going_on} goes on, metrics "
                      f"are kept in {self.pending.path} and sent when it is back", flush=True)
            elif ok and self.down:
                self.down = False
                print("[mlflow] tracking store is back; buffered metrics sent", flush=True)


def finish_run(uri: str, run_id: str, status: str, summary: dict | None = None, artifacts: list[Path] = (), *,
               pending: PendingMetrics | None = None, wait_s: float = FINISH_WAIT_S, log=print) -> bool:
    """Close the run with `status` after its pending metrics, with `summary` and `artifacts`; True once
    the store has it all. An unreachable store is waited for up to `wait_s`; then the rest stays in
    `pending`'s file, sent at the run's next start, and the console says so. Never raises, so a
    tracking outage at the end never turns a finished run into a traceback."""
    pending = pending or PendingMetrics(uri, default_pending_path(run_id))
    try:
        pending.add({"run_id": run_id, "finish": status, "summary": summary,
                     "artifacts": [str(p) for p in artifacts]})
    except OSError as err:
        log(f"[mlflow] cannot write {pending.path} ({err}); run {run_id} is not closed")
        return False
    if not send_pending(pending, wait_s, f"to close run {run_id} as {status}", f"run {run_id} closed as {status}", log):
        log(f"[mlflow] tracking store unreachable ({pending.error}): run {run_id} stays RUNNING in the store; "
            f"its pending metrics and final status ({status}) are kept in {pending.path} and sent when this run "
            "is resumed (its next start)")
        return False
    return True


def send_pending(pending: PendingMetrics, wait_s: float, waiting: str, done: str, log=print) -> bool:
    """Flush `pending`, waiting up to `wait_s` for an unreachable store; True once nothing is left. The
    console says once that it waits (``waiting``: for what) and, if it did, that the store is back (``done``)."""
    deadline, waited = time.monotonic() + wait_s, False
    while not pending.flush():
        if time.monotonic() >= deadline:
            return False
        if not waited:
            log(f"[mlflow] tracking store unavailable ({pending.error}); waiting up to {wait_s:.0f} s {waiting}")
            waited = True
        time.sleep(RETRY_S)
    if waited:
        log(f"[mlflow] tracking store is back: buffered metrics sent, {done}")
    return True


EXIT_WAIT_S = 10.0  # on the way out (Ctrl-C, an error): how long to wait for an unreachable store


def exit_status(err: BaseException) -> str:
    """The MLflow status of a run left by `err`: ``KILLED`` for an interrupt (Ctrl-C, SIGTERM, or the exit a
    signal handler raises — Ray's SIGTERM and Ray Train's SIGINT handlers call `sys.exit`), else ``FAILED``."""
    return "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"


def close_on_exit(uri: str, run_id: str, err: BaseException, *, pending: PendingMetrics | None = None,
                  wait_s: float | None = None, log=print) -> bool:
    """Mark `run_id` ``KILLED`` or ``FAILED`` (`exit_status`) as its command leaves by `err`, after its pending
    metrics; an unreachable store is waited for `wait_s` (an interrupt: `EXIT_WAIT_S`, an error: `FINISH_WAIT_S`),
    then `finish_run` says in one line that the run stays RUNNING and where its pending metrics wait. Never
    raises (a second Ctrl-C ends the wait)."""
    status = exit_status(err)
    if wait_s is None:
        wait_s = EXIT_WAIT_S if status == "KILLED" else FINISH_WAIT_S
    try:
        return finish_run(uri, run_id, status, pending=pending, wait_s=wait_s, log=log)
    except BaseException:  # noqa: BLE001 - interrupted again while closing: leave as it is
        return False


def mark_training_experiment(client, experiment_id: str) -> None:
    """Type the experiment for model training (`EXPERIMENT_KIND_TAG`) unless it already has a kind."""
    experiment = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG in (experiment.tags or {}):
        return
    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    except Exception as err:  # noqa: BLE001 - narrowed by `_already_exists`
        if not _already_exists(err):  # another process tagged it at the same moment: done
            raise


def close_run(client, run_id: str, status: str = "FINISHED") -> None:
    """`set_terminated` without the "🏃 View run … / 🧪 View experiment …" lines MLflow writes to stdout
    for every run a server-backed client closes (its ``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``, read at
    each call). Set process-wide, as a default a user can override: MLflow reads it in whichever process
    closes a run (this driver, Tune's callbacks, a Train controller), so `resolve_tracking_uri` sets it
    before Ray starts; the commands print their own link at the end (`ui_hint`)."""
    quiet_run_links()
    client.set_terminated(run_id, status=status)


def quiet_run_links() -> None:
    """No "🏃 View run" lines from MLflow in this process and the Ray processes it starts (see `close_run`)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def experiment_url(uri: str, experiment_id: str | None, run_id: str | None = None) -> str:
    """The UI page of the experiment's runs table (or of one run) on the server at `uri`, opened in the
    model-training view (``workflowType=machine_learning``)."""
    base = uri.rstrip("/") + "/#/experiments"
    if experiment_id is None:
        return base
    page = f"{base}/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return page + "?workflowType=machine_learning"


def ui_hint(uri: str, experiment_id: str | None = None, run_id: str | None = None, cwd: Path | None = None) -> str:
    """How to look at a run in the MLflow UI, runnable as printed: a server's page to open, or for an
    embedded store the `mlflow ui` command (``.venv/bin/mlflow`` when that exists under the working
    directory, as `make setup` makes it) and the page it serves."""
    uri = redact(_url_credentials(uri)[0] if uri.startswith(("http://", "https://")) else uri)
    if uri.startswith(("http://", "https://")):
        return f"open {experiment_url(uri, experiment_id, run_id)}"
    local = Path(cwd or Path.cwd()) / ".venv" / "bin" / "mlflow"
    command = ".venv/bin/mlflow" if local.exists() else "mlflow"
    return (f"`{command} ui --backend-store-uri {uri}` then open "
            f"{experiment_url('http://127.0.0.1:5000', experiment_id, run_id)}")


def log_metrics_once(client, run_id: str, metrics: dict[str, Any], step: int = 0) -> dict[str, float]:
    """Log `metrics` at `step` except those the run already holds with that value (a resumed or rebuilt
    run logs nothing twice; a changed value is logged anew, the latest is shown). Returns what was logged."""
    held = client.get_run(run_id).data.metrics
    new = {k: v for k, v in numeric_metrics(metrics).items() if not (k in held and math.isclose(held[k], v))}
    log_metrics(client, run_id, new, step)
    return new


def dataset_inputs(plan: dict) -> list[tuple[str, str, str, int]]:
    """(name, source uri, digest, rows) of a run's training and held-out data. The digest is of the
    prepared table's URI, which holds the fingerprint of both tables' contents (`prepare`): different
    data, different digest."""
    out = []
    for name, uri_key, rows_key in (("train", "train_uri", "train_pairs"), ("held-out", "eval_uri", "eval_pairs")):
        if plan.get(uri_key):
            digest = hashlib.sha256(str(plan[uri_key]).encode()).hexdigest()[:16]
            out.append((name, redact(str(plan[uri_key])), digest, int(plan.get(rows_key) or 0)))
    return out


def log_data_inputs(client, run_id: str, plan: dict, new_run: bool = False) -> None:
    """The training and held-out data as the run's MLflow dataset inputs (name, source, digest, rows;
    context ``training`` / ``evaluation``), each once: the UI's Datasets column and filter show them.
    ``new_run``: the caller just created the run (nothing to read back)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    held = set() if new_run else {(d.dataset.name, d.dataset.digest)
                                  for d in (client.get_run(run_id).inputs.dataset_inputs or [])}
    inputs = []
    for name, source, digest, rows in dataset_inputs(plan):
        if (name, digest) in held:
            continue
        dataset = Dataset(name=name, digest=digest, source_type="alphadpo-ray", source=json.dumps({"uri": source}),
                          profile=json.dumps({"num_rows": rows}))
        context = "training" if name == "train" else "evaluation"
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


POLICY_MODEL = "policy"
_POLICY_SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "chat_template.jinja")


def log_policy_model(client, run_id: str, policy_dir: Path, config_dict: dict) -> str | None:
    """The exported policy as the run's MLflow logged model ``policy`` (the run page and the experiment's
    Models tab link it): its model config and tokenizer files as artifacts (the weights stay where `train`
    exported them, named by the ``alphadpo.policy_path`` tag: a model of gigabytes is not copied into the
    tracking store), the method and its hyperparameters as params. Once per run; returns its model id."""
    from mlflow.entities import LoggedModelStatus

    experiment_id = client.get_run(run_id).info.experiment_id
    existing = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    if any(m.name == POLICY_MODEL for m in existing):
        return next(m.model_id for m in existing if m.name == POLICY_MODEL)
    method = config_dict.get("method") or {}
    params = {f"method.{k}": str(v) for k, v in method.items() if v is not None}
    model = client.create_logged_model(experiment_id, name=POLICY_MODEL, source_run_id=run_id, params=params,
                                       tags={"alphadpo.policy_path": redact(str(policy_dir))},
                                       model_type="causal-lm policy")
    with tempfile.TemporaryDirectory() as tmp:
        for name in _POLICY_SMALL_FILES:
            if (Path(policy_dir) / name).is_file():
                (Path(tmp) / name).write_bytes((Path(policy_dir) / name).read_bytes())
        (Path(tmp) / "alphadpo_config.json").write_text(json.dumps(mask_secrets(config_dict), indent=2))
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def log_train_views(uri: str | None, run_id: str | None, plan=None, policy: str | None = None,
                    config_dict: dict | None = None) -> None:
    """A train run's data inputs (`log_data_inputs`, with `plan`) or exported policy (`log_policy_model`,
    with `policy`), each once. Never fails the run: a store that refuses is said on the console."""
    if not uri or not run_id:
        return
    what = "data inputs" if plan is not None else "policy"
    if not server_reachable(uri):  # an outage: one short probe, not the MLflow client's minutes of retries
        print(f"[mlflow] {redact(uri)} does not answer: the run's {what} are not logged to MLflow", flush=True)
        return
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        if plan is not None:
            log_data_inputs(client, run_id, {k: getattr(plan, k) for k in
                                             ("train_uri", "eval_uri", "train_pairs", "eval_pairs")})
        if policy:
            log_policy_model(client, run_id, Path(policy), config_dict or {})
    except Exception as err:  # noqa: BLE001 - only what the UI shows: training is done or goes on
        print(f"[mlflow] could not log the run's {what} to MLflow: "
              f"{redact(str(err)).splitlines()[0][:300]}", flush=True)
