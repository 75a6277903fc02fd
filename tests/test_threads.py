"""Torch's CPU threads on a busy machine (alphadpo_ray/ml/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from alphadpo_ray.config.experiment import config_from_dict
from alphadpo_ray.training.launch import worker_env
from alphadpo_ray.ml.threads import available_cores, cpu_threads


def test_never_more_threads_than_cores_fewer_when_busy(monkeypatch):
    monkeypatch.delenv("ALPHADPO_RAY_THREADS", raising=False)
    cores = available_cores()
    assert cpu_threads(requested=cores * 4, load=0.0) == cores
    assert cpu_threads(requested=None, load=0.0) == cores
    assert cpu_threads(requested=None, load=cores + 6.0) == 1  # busy: one thread, never 0
    assert cpu_threads(requested=1, load=0.0) == 1
    monkeypatch.setenv("ALPHADPO_RAY_THREADS", "1")
    assert cpu_threads(requested=cores, load=0.0) == 1


def test_openmp_threads_wait_passively_in_the_driver_and_workers():
    code = "import os, alphadpo_ray, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.stdout.strip() == "PASSIVE"
    assert worker_env(config_from_dict({}))["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def test_sft_uses_the_thread_policy(tmp_path):
    """The SFT build sets torch's threads by the policy (before: torch's default, every core, however busy)."""
    code = """
import torch
from alphadpo_ray.ml.models import build_tiny_model, build_tokenizer
from alphadpo_ray.training.sft import train_sft
from alphadpo_ray.ml.task import SFTConfig
tok = build_tokenizer(["abc def", "ghi"], vocab_size=300)
model = build_tiny_model("llama", tok, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0)
ex = [{"prompt_ids": [1, 2], "response_ids": [3, 4]}]
torch.set_num_threads(2)
train_sft(model, ex, tok.pad_token_id, SFTConfig(steps=1, batch_size=1), progress=False)
print(torch.get_num_threads())
"""
    env = {**os.environ, "ALPHADPO_RAY_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"
