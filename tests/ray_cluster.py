"""A real multi-node Ray cluster on loopback for tests: `ray start --block` processes started by this
module (so their PIDs are ours), a head on 127.0.0.1 and more nodes on 127.0.0.2, 127.0.0.3, ...

Each node gets its own IP, CPUs and custom resources, and every port Ray would otherwise take from its
defaults is a free one picked here, so clusters of concurrent tests never collide. Token authentication
is on (``RAY_AUTH_MODE=token``) with a token file per cluster (``RAY_AUTH_TOKEN_PATH``), never the
user's ``~/.ray``. Each node has its own Ray temp dir, ``<temp_dir>/n0``, ``n1``, ... (as separate
machines have separate disks: nodes sharing one would unpack a job's working_dir over each other's copy,
pulling it from under the running driver). `temp_dir` is ``<root>/ray``, or a short directory under /tmp
(linked from there while it runs) when the AF_UNIX socket paths under ``<root>`` would be too long; the
nodes' logs are then copied to ``<root>/ray-logs/<ip>`` on stop. `stop()` ends exactly the process
trees it started (terminate, then kill after a timeout).

    with LocalCluster(tmp_path, nodes=[{"ip": "127.0.0.1", "num_cpus": 1},
                                       {"ip": "127.0.0.2", "num_cpus": 2, "resources": {"node_b": 1}}]) as c:
        subprocess.run([..., "--address", c.address], env=c.client_env())
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from services import free_port

VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests: the project's venv
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 8.0
OBJECT_STORE_BYTES = 150 * 1024 * 1024  # per node: enough for the tests, gentle on a small machine
# The longest socket Ray creates is <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store.N
SOCKET_SUFFIX_LEN = len("/n99/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store.99")
SOCKET_PATH_MAX = 107


_LIST_NODES = """
import json, sys, time
import ray
expected, timeout = set(json.loads(sys.argv[1])), float(sys.argv[2])
ray.init(address=sys.argv[3], logging_level="error", log_to_driver=False)
deadline = time.monotonic() + timeout
while True:
    # Ray starts a head given 127.0.0.1 on the machine's own address: it is the "head" entry.
    alive = {("head" if "node:__internal_head__" in n["Resources"] else n["NodeManagerAddress"]): n["NodeID"]
             for n in ray.nodes() if n["Alive"]}
    if expected <= set(alive) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print("NODES " + json.dumps(alive))
"""


class LocalCluster:
    """A head (``nodes[0]``) and more nodes, started with ``ray start --block`` on the given IPs.

    ``nodes``: dicts ``{"ip": "127.0.0.2", "num_cpus": 2, "resources": {"node_b": 1}}``; ``env``: extra
    environment for every node (e.g. ``AWS_ENDPOINT_URL``). Starts in ``__init__`` and waits until every
    node is alive; a context manager whose exit calls `stop()`."""

    def __init__(self, root: Path, nodes: list[dict], env: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes = [dict(node) for node in nodes]
        self._processes: dict[str, subprocess.Popen] = {}
        self._node_ids: dict[str, str] = {}
        self._stopped = False
        self.temp_dir, self._short_temp = self._make_temp_dir()
        self.token_path = self.root / "ray_auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        head = self.nodes[0]["ip"]
        self.gcs_port = free_port(head)
        self.dashboard_port = free_port(head)
        self.address = f"{head}:{self.gcs_port}"
        self.dashboard_url = f"http://{head}:{self.dashboard_port}"
        # RAY_ADDRESS on the nodes: Ray processes that look their cluster up ("auto", e.g. Ray Train's
        # placement-group cleaner) find this one, not another test's cluster on the same machine.
        self._env = {**self.client_env(), **(env or {}), "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_ADDRESS": self.address}
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self) -> dict[str, str]:
        """The environment a driver or CLI subprocess needs to reach this cluster as a user would:
        token auth on with this cluster's token, the venv's bin first on PATH, no inherited RAY_ADDRESS."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "VIRTUAL_ENV": str(VENV_BIN.parent)})
        return env

    def node_id(self, ip: str) -> str:
        """The hex node id of the node started on `ip` (known once it is alive)."""
        if ip not in self._node_ids:
            self._node_ids.update(self._alive_nodes({ip}, START_TIMEOUT_S))
        if ip not in self._node_ids:
            raise RuntimeError(f"no alive Ray node on {ip}\n{self.logs_tail()}")
        return self._node_ids[ip]

    def kill_node(self, ip: str) -> None:
        """SIGKILL the process tree of the node on `ip` at once (what a spot reclaim does)."""
        process = self._processes[ip]
        _kill(_tree(process.pid))
        process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Terminate every process tree this cluster started (by PID), kill what is left after a
        timeout; copy the logs beside the test if they lived in a short /tmp directory. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        trees = [proc for process in self._processes.values() for proc in _tree(process.pid)]
        for proc in trees:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(trees, timeout=STOP_TIMEOUT_S)
        _kill(alive)
        for process in self._processes.values():
            process.wait(timeout=STOP_TIMEOUT_S)
        if self._short_temp:
            for ip in self._processes:
                logs = self.node_temp_dir(ip) / "session_latest" / "logs"
                if logs.is_dir():
                    shutil.copytree(logs, self.root / "ray-logs" / ip, dirs_exist_ok=True,
                                    ignore_dangling_symlinks=True)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            (self.root / "ray").unlink(missing_ok=True)

    def logs_tail(self, lines: int = 30) -> str:
        """The last lines of each node's `ray start` output and of the raylet/GCS logs (for errors)."""
        parts = []
        for ip in self._processes:
            out = self.root / f"ray-start-{ip}.log"
            if out.exists():
                parts.append(f"--- ray start on {ip} ---\n" + _tail(out, lines))
            logs = self.node_temp_dir(ip) / "session_latest" / "logs"
            for name in ("gcs_server.out", "raylet.out", "raylet.err"):
                if (logs / name).exists():
                    parts.append(f"--- {name} on {ip} ---\n" + _tail(logs / name, lines))
        return "\n".join(parts)

    def node_temp_dir(self, ip: str) -> Path:
        """The Ray temp dir of the node on `ip` (its ``session_latest`` holds its logs and runtime_resources)."""
        return self.temp_dir / f"n{[node['ip'] for node in self.nodes].index(ip)}"

    def _make_temp_dir(self) -> tuple[Path, bool]:
        """Ray's temp dir: ``<root>/ray`` when its socket paths fit AF_UNIX's limit, else a short
        directory under /tmp (removed on stop) with ``<root>/ray`` linking to it."""
        wanted = self.root / "ray"
        if len(str(wanted)) + SOCKET_SUFFIX_LEN <= SOCKET_PATH_MAX:
            wanted.mkdir(exist_ok=True)
            return wanted, False
        short = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        if not wanted.exists():
            wanted.symlink_to(short, target_is_directory=True)
        return short, True

    def _start(self) -> None:
        """Start the head, then each other node once the previous one is up (a raylet that cannot
        register within Ray's 30 s startup window on a busy machine is started once more)."""
        head, *others = self.nodes
        deadline = time.monotonic() + START_TIMEOUT_S
        self._launch(head, ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                            "--dashboard-host", head["ip"], "--dashboard-port", str(self.dashboard_port),
                            "--ray-client-server-port", str(free_port(head["ip"])),
                            "--disable-usage-stats"], deadline)
        for node in others:
            self._launch(node, ["--address", self.address], deadline)
        expected = {node["ip"] for node in self.nodes}
        self._node_ids = self._alive_nodes(expected, max(deadline - time.monotonic(), 30.0))
        missing = expected - set(self._node_ids)
        if missing:
            raise RuntimeError(f"Ray nodes {sorted(missing)} did not join {self.address}\n{self.logs_tail()}")

    def _launch(self, node: dict, role_args: list[str], deadline: float, attempts: int = 2) -> None:
        """`ray start --block` for `node` with free ports; returns once it printed that it started."""
        ip = node["ip"]
        log_path = self.root / f"ray-start-{ip}.log"
        for attempt in range(attempts):
            ports = {"--node-manager-port": free_port(ip), "--object-manager-port": free_port(ip),
                     "--metrics-export-port": free_port(ip), "--dashboard-agent-listen-port": free_port(ip),
                     "--dashboard-agent-grpc-port": free_port(ip), "--runtime-env-agent-port": free_port(ip)}
            args = [str(VENV_BIN / "ray"), "start", "--block", *role_args, "--node-ip-address", ip,
                    "--num-cpus", str(node.get("num_cpus", 1)), "--num-gpus", "0",
                    "--resources", json.dumps(node.get("resources", {})),
                    "--object-store-memory", str(node.get("object_store_memory", OBJECT_STORE_BYTES)),
                    "--temp-dir", str(self.node_temp_dir(ip)), "--min-worker-port", "0", "--max-worker-port", "0",
                    *[str(part) for pair in ports.items() for part in pair]]
            env = {**self._env, "RAY_TMPDIR": str(self.node_temp_dir(ip))}
            with open(log_path, "a") as log:  # the child keeps its own descriptor
                process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, cwd=self.root)
            self._processes[ip] = process
            started: list[psutil.Process] = []
            while process.poll() is None and time.monotonic() < deadline:
                started = _tree(process.pid) or started
                if "Ray runtime started" in log_path.read_text(errors="replace"):
                    return
                time.sleep(0.5)
            if process.poll() is None or attempt == attempts - 1:
                break
            _kill(started)  # what a failed start left behind, before trying again
            process.wait()
        raise RuntimeError(f"Ray node {ip} did not start\n{self.logs_tail()}")

    def _alive_nodes(self, expected: set[str], timeout: float) -> dict[str, str]:
        """{ip: node id} of the alive nodes, polled (from a driver subprocess) until `expected` are all
        alive or `timeout` passes."""
        head = self.nodes[0]["ip"]
        wanted = sorted("head" if ip == head else ip for ip in expected)
        result = subprocess.run(
            [sys.executable, "-c", _LIST_NODES, json.dumps(wanted), str(timeout), self.address],
            env=self.client_env(), capture_output=True, text=True, timeout=timeout + 120, cwd=self.root)
        for line in result.stdout.splitlines():
            if line.startswith("NODES "):
                alive = json.loads(line[len("NODES "):])
                if "head" in alive:
                    alive[head] = alive.pop("head")
                return alive
        raise RuntimeError(f"could not list the nodes of {self.address}:\n{result.stdout[-3000:]}"
                           f"\n{result.stderr[-3000:]}\n{self.logs_tail()}")


def _tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill(processes: list[psutil.Process]) -> None:
    """SIGKILL `processes` (psutil checks each is still the process it was, not a reused PID) and wait."""
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=STOP_TIMEOUT_S)


def _tail(path: Path, lines: int) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if "[state-dump]" not in line]
        return "\n".join(text[-lines:])
    except OSError as err:
        return f"({err})"
