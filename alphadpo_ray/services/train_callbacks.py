"""Ray Train callbacks of a training run, run in the Train controller (one process) on every report:
`MLflowMetricsCallback` logs the metrics to MLflow through an on-disk `PendingMetrics` buffer (a tracking
outage never stops training), `ConsoleProgress` prints one progress line."""

from __future__ import annotations

import re
import time
from pathlib import Path

from .. import compat
from .tracking import MetricsSender, PendingMetrics, default_pending_path, numeric_metrics, report_by_step

# Each Ray Train worker's report carries its node's IP under this key (the worker → controller side of the
# reports): `ConsoleProgress` names the node a lost worker was on. Not a metric (not numeric).
WORKER_NODE_KEY = "worker/node_ip"

try:
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - Ray Train V1
    _UserCallback = object


class MLflowMetricsCallback(_UserCallback):
    """Logs rank 0's (already all-reduced) metrics of every report to one MLflow run, never stopping
    training.

    It runs in the Train controller (one process, on the driver's node): each report is appended to
    the run's `PendingMetrics` file (a local write that never waits on the network). With ``send=False``
    that is all it does: the driver, on the same node, sends the file (`launch._fit`), so the controller
    never imports MLflow (a second or two of every run's start); otherwise (a Ray Client driver, elsewhere;
    an in-process run) a background `MetricsSender` here sends it, until `close`. While the store is
    unreachable the reports stay in the file and the outage is reported once; the driver flushes what is
    left when the run ends (`finish_run`). Steps up to `logged_through` (already in the run's history when it resumed)
    and steps replayed after a worker-group restart are not logged again: each step appears once."""

    def __init__(self, tracking_uri: str, run_id: str, pending_path: str | Path | None = None,
                 logged_through: int = -1, send: bool = True):
        self.tracking_uri, self.run_id, self.send = tracking_uri, run_id, send
        self.pending_path = str(pending_path or default_pending_path(run_id))
        self.last_step = logged_through
        self._sender: MetricsSender | None = None
        self._failed = False

    def __getstate__(self):
        return {**self.__dict__, "_sender": None}

    def close(self) -> None:
        """Stop this process's sender, if it started one (what it had not sent stays in the file)."""
        if self._sender is not None:
            self._sender.stop(timeout=30)
            self._sender = None

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        for step, part in report_by_step(metrics[0]):
            if step > self.last_step:  # a step replayed after a resume, or an evaluation already logged: skip
                self.last_step = step
                self._send(step, {k: v for k, v in numeric_metrics(part).items() if k not in ("step", "total_steps")})

    def _send(self, step: int, values: dict) -> None:
        event = {"run_id": self.run_id, "step": step, "ts": int(time.time() * 1000), "metrics": values}
        try:
            if not self.send:
                PendingMetrics(self.tracking_uri, self.pending_path).add(event)
                return
            if self._sender is None:
                self._sender = MetricsSender(PendingMetrics(self.tracking_uri, self.pending_path))
            self._sender.add(event)
        except Exception as err:  # noqa: BLE001 - e.g. a full local disk: this step is lost, training goes on
            if not self._failed:
                self._failed = True
                print(f"[mlflow] cannot buffer metrics in {self.pending_path} ({err}); some steps will be missing "
                      "from MLflow", flush=True)


_NODE_IP = re.compile(r"\bip: (\d+\.\d+\.\d+\.\d+)|ipv4:(\d+\.\d+\.\d+\.\d+):")  # in a dead actor's error


def _node_answers(ip: str, timeout: float = 1.0) -> bool:
    """Whether the Ray node at `ip` is alive and its raylet accepts a connection (`ray.nodes()`; Ray marks a
    killed node dead only after missed heartbeats, seconds later, so a node it still lists is asked)."""
    import socket

    import ray

    try:
        node = next((n for n in ray.nodes() if n.get("NodeManagerAddress") == ip), None)
        if node is None or not node.get("Alive"):
            return False
        with socket.create_connection((ip, int(node["NodeManagerPort"])), timeout=timeout):
            return True
    except OSError:
        return False
    except Exception:  # noqa: BLE001 - no answer from Ray itself: say nothing about the node
        return True


class ConsoleProgress(_UserCallback):
    """One compact progress line per report (step, loss, held-out accuracy and KL, throughput), and one
    line per failed worker group (`after_exception`). Runs where the reports arrive: the Train controller
    (printed there, forwarded to the driver's console), or this process for an in-process run (failure
    lines through ``log`` when given).
    ``max_failures`` / ``max_preemption_failures``: the run's budgets (-1: unlimited), counted as Ray Train's
    failure policy counts them (`compat.train_worker_preempted`); ``resumed``: this start continues from a
    stored checkpoint."""

    def __init__(self, max_failures: int = -1, max_preemption_failures: int = -1, resumed: bool = False, log=None):
        self.budget = {"ray.max_failures": max_failures, "ray.max_preemption_failures": max_preemption_failures}
        self.resumed, self.log = resumed, log
        self.step, self.checkpoint_step, self._last_failure = 0, None, None
        self.nodes: dict[int, str] = {}  # rank → its node's IP, from the reports (`plan.WORKER_NODE_KEY`)
        self.failures = {key: 0 for key in self.budget}

    def _say(self, line: str) -> None:
        if self.log is None:
            print(line, flush=True)
        else:
            self.log(line)

    def after_exception(self, run_context, worker_exceptions):
        """``[failure] node 127.0.0.3 lost at step 11; resuming from step 8 (3 steps lost)``: which node (from a
        dead worker's error) or which workers and why, the last step reported, and where the run goes on
        from — the latest checkpoint, or, with none yet, step 0 (``no checkpoint yet: starting over, N steps
        lost``). Once per failure (the traces stay in the workers' log files): under Ray Train a poll that
        repeats the errors already said (same step, ranks and texts) is skipped — a restarted group's failure
        differs (its workers' pids and actor ids are in the texts); an in-process run (``log`` given) calls
        this exactly once per failure, so every call counts."""
        texts = {rank: f"{type(err).__name__}: {err}" for rank, err in sorted(worker_exceptions.items())}
        key = (self.step, tuple(texts.items()))
        if self.log is None and key == self._last_failure:
            return
        self._last_failure = key
        kind = ("ray.max_preemption_failures" if any(compat.train_worker_preempted(e) for e in worker_exceptions.values())
                else "ray.max_failures")
        self.failures[kind] += 1
        dead = [rank for rank, err in worker_exceptions.items() if compat.train_worker_died(err)]
        nodes = sorted({self.nodes[rank] for rank in dead if rank in self.nodes}
                       or {a or b for rank in dead for a, b in _NODE_IP.findall(texts[rank])}
                       # survivors failing first (a peer's connection closed): the silent ranks' nodes, if gone
                       or {ip for rank, ip in self.nodes.items() if rank not in worker_exceptions and not
                           _node_answers(ip)})
        if nodes:
            what = f"node{'s' if len(nodes) > 1 else ''} {', '.join(nodes)} lost at step {self.step}"
        else:
            text = next(iter(texts.values()))
            first = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
            what = (f"worker{'s' if len(texts) > 1 else ''} {', '.join(map(str, texts))} failed at step {self.step} "
                    f"({first[:160]}{'…' if len(first) > 160 else ''})")
        if self.budget[kind] != -1 and self.failures[kind] > self.budget[kind]:
            then = f"no failures left ({kind} {self.budget[kind]}): the run stops"
        elif self.checkpoint_step is not None:
            lost = self.step - self.checkpoint_step
            then = f"resuming from step {self.checkpoint_step} ({lost} step{'' if lost == 1 else 's'} lost)"
        elif self.resumed:
            then = "resuming from the checkpoint this start resumed from"
        else:
            then = (f"no checkpoint yet: starting over, {self.step} step{'' if self.step == 1 else 's'} lost")
        self._say(f"[failure] {what}; {then}")

    def after_report(self, run_context, metrics, checkpoint):
        self.nodes.update({rank: m[WORKER_NODE_KEY] for rank, m in enumerate(metrics or []) if WORKER_NODE_KEY in m})
        if metrics and "step" in metrics[0]:
            self.step = int(metrics[0]["step"])
            if checkpoint is not None:
                self.checkpoint_step = self.step
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
