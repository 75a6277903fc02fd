"""The cluster configs agree with each other and with the project (fast, no cloud, no Kubernetes):
kuberay/raycluster.yaml and kuberay/rayjob.yaml have the structure KubeRay expects (autoscaler v2, a
head with 0 CPUs, a GPU worker group that scales from 0) and cluster.yaml's node shapes, Ray version,
storage mount and limits; the RayJob's sweep fits the cluster it asks for. (cluster.yaml against Ray's
own schema: tests/test_config.py.)"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "kuberay"
IMAGE_DIR = "/home/ray/alphadpo-ray"  # where kuberay/Dockerfile puts the repository
STORAGE_MOUNT = "/mnt/cluster_storage"
PAPER_CONFIGS = sorted((ROOT / "experiments" / "paper").glob("*.yaml"))


def _one(path: Path) -> dict:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(documents) == 1, path
    return documents[0]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def gpu_worker(cluster) -> dict:
    workers = {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    assert list(workers) == ["gpu_worker"]
    return workers["gpu_worker"]


@pytest.fixture(scope="module", params=["raycluster", "rayjob"])
def spec(request) -> dict:
    """The RayCluster spec of kuberay/raycluster.yaml, and the one kuberay/rayjob.yaml embeds."""
    manifest = _one(KUBERAY / f"{request.param}.yaml")
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == {"raycluster": "RayCluster", "rayjob": "RayJob"}[request.param]
    assert manifest["metadata"]["name"]
    return manifest["spec"] if request.param == "raycluster" else manifest["spec"]["rayClusterSpec"]


def _container(template: dict) -> dict:
    containers = template["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _quantity(value) -> float:
    """A Kubernetes CPU quantity ("90", "500m", 8) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _paper_workers_per_node(cpus: float, gpus: float) -> int:
    """How many paper-config workers ({CPU: 8, GPU: 1} each) one node holds."""
    per_worker = {tuple(sorted(yaml.safe_load(p.read_text())["ray"]["resources_per_worker"].items()))
                  for p in PAPER_CONFIGS}
    assert len(per_worker) == 1, per_worker  # one shape for all paper setups
    need = dict(next(iter(per_worker)))
    return int(min(cpus // need["CPU"], gpus // need["GPU"]))


def test_kuberay_cluster_structure(spec, cluster):
    """Autoscaler v2 in-tree, token auth, a head that runs no work, GPU workers scaling from zero."""
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["version"] == "v2"
    assert options["idleTimeoutSeconds"] == cluster["idle_timeout_minutes"] * 60
    assert spec["authOptions"]["mode"] == "token"  # Ray 2.60 clients expect it (RAY_AUTH_MODE=token)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = _container(head["template"])
    assert {"name": "RAY_enable_autoscaler_v2", "value": "1"} in head_container["env"]
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
    assert group["maxReplicas"] >= 1 and group["groupName"]
    resources = _container(group["template"])["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == int(resources["limits"]["nvidia.com/gpu"]) > 0


def test_kuberay_node_shapes_match_cluster_yaml(spec, cluster, gpu_worker):
    """Same GPUs per worker node, same number of paper workers per node, same maximum node count."""
    (group,) = spec["workerGroupSpecs"]
    limits = _container(group["template"])["resources"]["limits"]
    node = gpu_worker["resources"]
    assert int(limits["nvidia.com/gpu"]) == node["GPU"]
    assert group["maxReplicas"] == gpu_worker["max_workers"] <= cluster["max_workers"]
    assert gpu_worker["min_workers"] == group["minReplicas"] == 0
    assert _quantity(limits["cpu"]) <= node["CPU"]  # a pod gets its node less what Kubernetes keeps
    assert _paper_workers_per_node(_quantity(limits["cpu"]), int(limits["nvidia.com/gpu"])) \
        == _paper_workers_per_node(node["CPU"], node["GPU"]) == 8
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"]["CPU"] == 0
    assert any("--num-cpus=0" in c for c in cluster["head_start_ray_commands"])


def test_ray_versions_agree(spec, cluster):
    """The installed Ray (what pyproject admits) is the Ray of cluster.yaml's image, the Dockerfile's
    base image, the manifests' rayVersion and the tag of every image they run."""
    from packaging.specifiers import SpecifierSet

    version = ray.__version__
    pin = re.search(r'"ray\[[^]]*\]([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert version in SpecifierSet(pin), (version, pin)
    assert cluster["docker"]["image"] == f"rayproject/ray:{version}-py311-gpu"
    base = re.search(r"^FROM\s+(\S+)", (KUBERAY / "Dockerfile").read_text(), re.M).group(1)
    assert base == cluster["docker"]["image"]
    assert spec["rayVersion"] == version
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    for template in templates:
        image = _container(template)["image"]
        assert image.rsplit(":", 1)[1] == f"{version}-py311-gpu", image


def test_storage_and_tracking_reach_every_pod(spec, cluster):
    """The paper configs' storage path is on a volume every node mounts (EFS in cluster.yaml, a shared
    claim in KubeRay); the MLflow server and tokens come from one Secret on the head (the driver logs)."""
    storages = {yaml.safe_load(p.read_text())["ray"]["storage_path"] for p in PAPER_CONFIGS}
    assert all(s.startswith(STORAGE_MOUNT + "/") for s in storages), storages
    assert any(f"{STORAGE_MOUNT}:{STORAGE_MOUNT}" in option for option in cluster["docker"]["run_options"])
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    claims = set()
    for template in templates:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in _container(template)["volumeMounts"]}
        claims.add(volumes[mounts[STORAGE_MOUNT]]["persistentVolumeClaim"]["claimName"])
    pvc = _one(KUBERAY / "storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and claims == {pvc["metadata"]["name"]}
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    head_env = _container(spec["headGroupSpec"]["template"])["envFrom"]
    assert any(e.get("secretRef", {}).get("name") for e in head_env)


def test_rayjob_runs_a_sweep_that_fits_its_cluster():
    """The RayJob's entrypoint is a valid sweep of a config shipped in the image, and its concurrent
    trials (max_concurrent_trials × workers × GPUs per worker) fit maxReplicas GPU nodes."""
    from alphadpo_ray.config.experiment import load_config

    job = _one(KUBERAY / "rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    words = shlex.split(job["entrypoint"])
    assert words[:4] == ["python", "-m", "alphadpo_ray", "sweep"]
    config_path = words[4]
    assert config_path.startswith(IMAGE_DIR + "/")
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    config = load_config(ROOT / config_path[len(IMAGE_DIR) + 1:], overrides)
    assert config.sweep is not None and config.sweep.name
    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    gpus_per_node = int(_container(group["template"])["resources"]["limits"]["nvidia.com/gpu"])
    gpus_per_trial = config.ray.num_workers * config.ray.resources_per_worker["GPU"]
    nodes = math.ceil(config.sweep.max_concurrent_trials * gpus_per_trial / gpus_per_node)
    assert nodes == group["maxReplicas"], (nodes, group["maxReplicas"])


def test_rayjob_cluster_is_raycluster():
    """One cluster definition: the RayJob's cluster is kuberay/raycluster.yaml's."""
    assert _one(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"] == _one(KUBERAY / "raycluster.yaml")["spec"]
