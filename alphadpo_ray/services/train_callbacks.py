"""Ray Train callbacks of a training run, run in the Train controller (one process) on every report:
`MLflowMetricsCallback` logs the metrics to MLflow through an on-disk `PendingMetrics` buffer (a tracking
outage never stops training), `ConsoleProgress` prints one progress line."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from .tracking import RETRY_S, PendingMetrics, default_pending_path, numeric_metrics, report_by_step

try:
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - Ray Train V1
    _UserCallback = object


class _Sender:
    """A daemon thread that flushes a `PendingMetrics` file when a report arrives, and every `RETRY_S`
    seconds while the store does not answer; each outage is reported once on the console."""

    def __init__(self, pending: PendingMetrics):
        self.pending, self.wake, self.down = pending, threading.Event(), False
        threading.Thread(target=self._loop, name="alphadpo-mlflow-sender", daemon=True).start()

    def add(self, event: dict) -> None:
        self.pending.add(event)
        self.wake.set()

    def _loop(self) -> None:
        while True:
            self.wake.wait(RETRY_S)
            self.wake.clear()
            ok = self.pending.flush()
            if not ok and not self.down:
                self.down = True
                print(f"[mlflow] tracking store unavailable ({self.pending.error}); training goes on, metrics are "
                      f"kept in {self.pending.path} and sent when it is back", flush=True)
            elif ok and self.down:
                self.down = False
                print("[mlflow] tracking store is back; buffered metrics sent", flush=True)


class MLflowMetricsCallback(_UserCallback):
    """Logs rank 0's (already all-reduced) metrics of every report to one MLflow run, never stopping
    training.

    It runs in the Train controller (one process, on the driver's node): each report is appended to
    the run's `PendingMetrics` file (a local write that never waits on the network) and a background
    `_Sender` sends it. While the store is unreachable the reports stay in the file and the outage is
    reported once; the driver flushes what is left when the run ends (`finish_run`). Steps up to
    `logged_through` (already in the run's history when it resumed) and steps replayed after a
    worker-group restart are not logged again: each step appears once."""

    def __init__(self, tracking_uri: str, run_id: str, pending_path: str | Path | None = None,
                 logged_through: int = -1):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.pending_path = str(pending_path or default_pending_path(run_id))
        self.last_step = logged_through
        self._sender: _Sender | None = None
        self._failed = False

    def __getstate__(self):
        return {**self.__dict__, "_sender": None}

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        for step, part in report_by_step(metrics[0]):
            if step > self.last_step:  # a step replayed after a resume, or an evaluation already logged: skip
                self.last_step = step
                self._send(step, {k: v for k, v in numeric_metrics(part).items() if k not in ("step", "total_steps")})

    def _send(self, step: int, values: dict) -> None:
        try:
            if self._sender is None:
                self._sender = _Sender(PendingMetrics(self.tracking_uri, self.pending_path))
            self._sender.add({"run_id": self.run_id, "step": step, "ts": int(time.time() * 1000), "metrics": values})
        except Exception as err:  # noqa: BLE001 - e.g. a full local disk: this step is lost, training goes on
            if not self._failed:
                self._failed = True
                print(f"[mlflow] cannot buffer metrics in {self.pending_path} ({err}); some steps will be missing "
                      "from MLflow", flush=True)


class ConsoleProgress(_UserCallback):
    """One compact progress line per report (step, loss, held-out accuracy and KL, throughput)."""

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics or "train/loss" not in metrics[0]:
            return
        m = metrics[0]
        line = f"step {int(m['step'])}/{int(m.get('total_steps', 0))}  loss {m['train/loss']:.4f}"
        line += f"  margin {m.get('train/rewards/margin', float('nan')):+.3f}"
        if "eval/accuracy" in m:
            line += f"  | eval@{int(m.get('eval/step', 0))} acc {m['eval/accuracy']:.3f}"
            if "eval/accuracy_logratio" in m:
                line += f" acc_logratio {m['eval/accuracy_logratio']:.3f}"
            if "eval/kl" in m:
                line += f" kl {m['eval/kl']:.3f}"
            if "eval/generation_accuracy" in m:
                line += f" gen {m['eval/generation_accuracy']:.2f}"
        line += f"  | {m.get('train/tokens_per_second_per_worker', 0):.0f} tok/s/worker"
        if checkpoint is not None:
            line += "  [checkpoint]"
        print(line, flush=True)
