"""An autoscaler that follows the sweep, with Ray's fake multi-node provider (the one
`ray.cluster_utils.AutoscalingCluster` and Ray's own autoscaler tests use: worker "nodes" are real
raylets started on this machine by the autoscaler itself).

The head runs only the driver (0 CPUs); the worker node type is shaped like cluster.yaml's
``gpu_worker``, with a custom resource ``accel`` standing in for GPUs (these machines have none).
A sweep whose trials each ask for ``{CPU: 1, accel: 1}`` makes the autoscaler add nodes
(max_concurrent_trials × per-trial resources / per-node resources = 4 × 1 / 2 = 2 nodes), the
trials run there, and the idle nodes are removed after the idle timeout. The figures (scale-up
latency, peak nodes, trials per node, scale-down after idle) are printed and written to
``autoscaler_figures.json`` beside the test's files.

`AutoscalingCluster` itself is not used to start the cluster: its ``start``/``shutdown`` run
``ray stop --force`` (which would end every Ray instance on the machine, other tests' included), it
uses the default port 6379, and the Ray 2.60 wheel lacks the ``fake_multi_node/example.yaml`` its
constructor reads. `fake_cluster_config` builds the same config; the head is a `LocalCluster`
head (free ports, token auth, its own temp dir) started with ``--autoscaling-config`` and the
environment `AutoscalingCluster.start` sets.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import small_config
from ray_cluster import LocalCluster
from services import stop_tree


ACCEL = "accel"  # the GPU stand-in
WORKER_TYPE = "gpu_worker"
NODE_RESOURCES = {"CPU": 2, ACCEL: 2}  # per node: 2 trials of {CPU: 1, accel: 1}
TRIAL_RESOURCES = {"CPU": 1, ACCEL: 1}
MAX_WORKER_NODES = 3
TRIALS = 4
IDLE_TIMEOUT_S = 12
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # ray.autoscaler._private.fake_multi_node.node_provider
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
HEAD_IP = "127.0.0.7"  # not 127.0.0.1: Ray replaces that with the machine's address


def fake_cluster_config(worker_node_types: dict, gcs_address: str, idle_timeout_s: float) -> dict:
    """The cluster config `AutoscalingCluster(head_resources={"CPU": 0}, worker_node_types,
    autoscaler_v2=True)` generates (Ray's fake_multi_node/example.yaml with these node types), with
    the head's GCS address given to the fake provider (it assumes port 6379 otherwise)."""
    return {
        "cluster_name": "fake_multinode",
        "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
        "provider": {"type": "external", "module": FAKE_PROVIDER, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True, "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID, "gcs_address": gcs_address},
        "available_node_types": {**worker_node_types,
                                 "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_s / 60, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


class AutoscalingLocalCluster(LocalCluster):
    """A `LocalCluster` head (0 CPUs) that runs Ray's autoscaler v2 over the fake multi-node provider."""

    def __init__(self, root: Path, worker_node_types: dict, idle_timeout_s: float):
        self._worker_node_types, self._idle_timeout_s = worker_node_types, idle_timeout_s
        env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
               "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
        super().__init__(root, [{"ip": HEAD_IP, "num_cpus": 0}], env=env)

    def _launch(self, node: dict, role_args: list[str], *args, **kwargs) -> None:
        """The head's `ray start` gets the autoscaling config (the monitor it starts reads it)."""
        if "--head" in role_args:
            path = self.root / "autoscaling-config.json"
            path.write_text(json.dumps(fake_cluster_config(self._worker_node_types, self.address,
                                                           self._idle_timeout_s)))
            role_args = [*role_args, "--autoscaling-config", str(path)]
        super()._launch(node, role_args, *args, **kwargs)


# Polls the cluster from one driver connection: a JSON line per tick with each alive worker node and
# how much of its accelerator is in use; when the stop file appears, one line with every actor's node.
_WATCH = """
import json, os, sys, time
import ray
from ray._private import state
address, out_path, stop_path, accel = sys.argv[1:5]
ray.init(address=address, logging_level="error", log_to_driver=False)
with open(out_path, "a") as out:
    while not os.path.exists(stop_path):
        free = state.available_resources_per_node()
        workers = {n["NodeID"]: n["Resources"].get(accel, 0) - free.get(n["NodeID"], {}).get(accel, 0)
                   for n in ray.nodes() if n["Alive"] and accel in n["Resources"]}
        out.write(json.dumps({"t": time.time(), "workers": workers}) + "\\n")
        out.flush()
        time.sleep(0.5)
    actors = [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"]} for a in state.actors().values()]
    out.write(json.dumps({"t": time.time(), "actors": actors}) + "\\n")
"""


def _processes_using(path: str) -> list[psutil.Process]:
    """Processes whose command line names `path` (this test's Ray temp dir: every Ray process of
    this cluster, fake nodes included, carries its session directory there)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(path in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _sweep_config(tmp_path: Path) -> Path:
    """Four single-worker SimPO trials (no reference pass, so every scale-up is the trials'), all
    requested at once, each asking for a CPU and an accelerator."""
    config = small_config(
        tmp_path, name="autoscale", method={"name": "simpo"}, deepspeed={"zero_stage": 0},
        ray={"num_workers": 1, "resources_per_worker": TRIAL_RESOURCES},
        training={"per_device_train_batch_size": 8, "total_batch_size": 8, "max_steps": 4, "eval_steps": 4,
                  "logging_steps": 2, "save_steps": 4},
        sweep={"name": "autoscale", "num_samples": TRIALS, "max_concurrent_trials": TRIALS, "seed": 0},
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _figures(ticks: list[dict], actors: list[dict], started: float, trials_requested: float | None,
             ended: float) -> dict:
    """Scale-up latency, peak worker nodes, trials per node, scale-down after the sweep and after idle."""
    first_up = next((t["t"] for t in ticks if t["workers"]), None)
    last_busy = max((t["t"] for t in ticks if any(used > 0 for used in t["workers"].values())), default=None)
    all_down = next((t["t"] for t in ticks if last_busy and t["t"] > last_busy and not t["workers"]), None)
    nodes = {node for t in ticks for node in t["workers"]}
    trial_actors = [a for a in actors if a["node"] in nodes and a["class"].endswith("ImplicitFunc")]  # Tune trials
    per_node = {node: sum(a["node"] == node for a in trial_actors) for node in sorted(nodes)}
    peak_busy = {node: max(t["workers"].get(node, 0) for t in ticks) for node in sorted(nodes)}

    def seconds(a, b):
        return None if a is None or b is None else round(a - b, 1)

    return {
        "worker_node_shape": NODE_RESOURCES, "trial_resources": TRIAL_RESOURCES, "trials": TRIALS,
        "max_concurrent_trials": TRIALS, "max_worker_nodes": MAX_WORKER_NODES, "idle_timeout_s": IDLE_TIMEOUT_S,
        "scale_up_s_from_sweep_start": seconds(first_up, started),
        "scale_up_s_from_trials_requested": seconds(first_up, trials_requested),
        "peak_worker_nodes": max((len(t["workers"]) for t in ticks), default=0),
        "worker_nodes_used": len(nodes),
        "trials_per_node": list(per_node.values()),
        "peak_concurrent_trials_per_node": list(peak_busy.values()),
        "scale_down_s_after_sweep_end": seconds(all_down, ended),  # negative: gone before the driver exited
        "scale_down_s_after_last_trial": seconds(all_down, last_busy),
        "sweep_wall_s": round(ended - started, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def test_trial_resources_carry_the_workers_custom_resources():
    """What a trial reserves is what the autoscaler scales for: a direct trial is the worker (all of
    resources_per_worker, GPU with use_gpu); a multi-worker trial's actor only needs sweep.trial_cpus."""
    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.sweep.run import sweep_settings, trial_resources

    def resources(ray_section, sweep=None):
        training = {"per_device_train_batch_size": 1, "total_batch_size": 8}
        config = config_from_dict({"ray": ray_section, "sweep": sweep or {}, "training": training})
        return trial_resources(config, sweep_settings(config))

    assert resources({"num_workers": 1, "resources_per_worker": TRIAL_RESOURCES}) == TRIAL_RESOURCES
    assert resources({"num_workers": 1, "resources_per_worker": {ACCEL: 1}}) == {"CPU": 1, ACCEL: 1}
    assert resources({"num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 8}}) == {"CPU": 8, "GPU": 1}
    assert resources({"num_workers": 4, "use_gpu": True, "resources_per_worker": {"CPU": 8, "GPU": 1}}) == {"CPU": 0.01}
    assert resources({"num_workers": 1, "resources_per_worker": TRIAL_RESOURCES},
                     {"direct_single_worker": False, "trial_cpus": 0.5}) == {"CPU": 0.5}


@pytest.mark.slow
def test_autoscaler_follows_the_sweep(builtin_task, tmp_path):
    """0 worker nodes → the sweep's trials make the autoscaler add exactly the nodes they need
    (2 of at most 3), every trial runs on them (2 per node), and the nodes go away once idle."""
    config_path = _sweep_config(tmp_path)
    watch_log, stop_file = tmp_path / "watch.jsonl", tmp_path / "watch.stop"
    worker_types = {WORKER_TYPE: {"resources": NODE_RESOURCES, "node_config": {}, "min_workers": 0,
                                  "max_workers": MAX_WORKER_NODES}}
    cluster = watcher = sweep = None
    leftovers: list[psutil.Process] = []
    lines: list[tuple[float, str]] = []
    try:
        cluster = AutoscalingLocalCluster(tmp_path / "cluster", worker_types, IDLE_TIMEOUT_S)
        env = cluster.client_env()
        with open(tmp_path / "watch.err", "w") as watch_err:  # the child keeps its own descriptor
            watcher = subprocess.Popen([sys.executable, "-c", _WATCH, cluster.address, str(watch_log),
                                        str(stop_file), ACCEL], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                       stderr=watch_err)

        def ticks() -> list[dict]:
            lines = watch_log.read_text().splitlines() if watch_log.exists() else []
            return [json.loads(x) for x in lines if x.strip().endswith("}")]

        deadline = time.time() + 120
        while not ticks() and watcher.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert ticks(), (tmp_path / "watch.err").read_text()[-3000:]
        assert not ticks()[-1]["workers"], "min_workers is 0: no worker node before the sweep"

        started = time.time()
        sweep = subprocess.Popen(
            [str(Path(sys.executable).with_name("alphadpo-ray")), "sweep", str(config_path), "--address",
             cluster.address], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)

        def read_output():
            with open(tmp_path / "sweep.log", "w") as log:
                for line in sweep.stdout:
                    lines.append((time.time(), line))
                    log.write(line)
                    log.flush()

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        assert sweep.wait(timeout=420) == 0, "".join(line for _, line in lines)[-4000:]
        ended = time.time()
        reader.join(timeout=10)

        deadline = time.time() + IDLE_TIMEOUT_S + 90
        while time.time() < deadline and (ticks()[-1]["workers"] or ticks()[-1]["t"] < ended):
            time.sleep(1)
        stop_file.touch()
        assert watcher.wait(timeout=60) == 0, (tmp_path / "watch.err").read_text()[-3000:]
        records = ticks()
        actors = next(r["actors"] for r in records if "actors" in r)
        records = [r for r in records if "workers" in r]
    finally:
        if sweep is not None and sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)  # the driver and what it started (its own session)
        for process in (sweep, watcher):
            if process is not None:
                stop_tree(process, timeout=15)
        if cluster is not None:
            cluster.stop()  # the head's process tree: GCS, autoscaler, and the fake nodes it started
            leftovers = _processes_using(str(cluster.temp_dir))
            for proc in leftovers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
    assert not leftovers, f"processes of the fake cluster outlived its head: {leftovers}"

    requested = next((t for t, line in lines if line.startswith("[sweep]") and "trials" in line), None)
    figures = _figures(records, actors, started, requested, ended)
    (tmp_path / "autoscaler_figures.json").write_text(json.dumps(figures, indent=2))
    print("autoscaler figures:", json.dumps(figures, indent=2))

    results = json.loads((tmp_path / "outputs" / "autoscale" / "results.json").read_text())
    assert results["summary"]["trials"] == TRIALS and results["summary"]["failed"] == 0
    needed = math.ceil(TRIALS * TRIAL_RESOURCES[ACCEL] / NODE_RESOURCES[ACCEL])
    assert figures["peak_worker_nodes"] == needed <= MAX_WORKER_NODES
    assert figures["scale_up_s_from_sweep_start"] > 0
    assert sum(figures["trials_per_node"]) == TRIALS, figures  # every trial ran on an added node
    assert max(figures["peak_concurrent_trials_per_node"]) == NODE_RESOURCES[ACCEL]
    assert not records[-1]["workers"], "idle worker nodes were not removed"
    assert figures["scale_down_s_after_last_trial"] >= IDLE_TIMEOUT_S * 0.8, figures
