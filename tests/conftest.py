"""Shared fixtures: a tiny offline model directory built once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Keep tests offline and quiet, whatever the environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The built-in task's SFT reference is built once per machine and reused by every test (and by the
# Ray workers the tests start, which inherit this environment).
os.environ.setdefault("ALPHADPO_RAY_CACHE", str(Path(tempfile.gettempdir()) / "alphadpo-ray-test-cache"))

SAMPLE_TEXTS = [
    "What is 12 + 34? The answer is 46.",
    "Sort the letters d b a c. Answer: a b c d",
    "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, then bake it.",
    "Reverse the word 'hello': olleh",
] * 20


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding a tiny random Llama and its byte-level BPE tokenizer (save_pretrained)."""
    from alphadpo_ray.models import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), SAMPLE_TEXTS, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from alphadpo_ray.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def builtin_task():
    """The built-in task with its default SFT reference (what experiments/quickstart.yaml uses)."""
    from alphadpo_ray.sft import prepare_builtin_task

    return prepare_builtin_task(progress=False)
