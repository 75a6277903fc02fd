"""The reference cache key: every input that changes the reference's numbers changes the key, nothing
else does; the reference is scored with the policy's dtype / attention / remote-code settings; a hub
reference is keyed on (and pinned to) the commit actually loaded, read from a local fake hub cache."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pyarrow as pa

from alphadpo_ray.training import reference_cache as rc

TRUNCATION = {"max_length": 64, "max_prompt_length": 32, "truncation_mode": "keep_end"}
SHA_MAIN = "1" * 40  # what refs/main points at ...
SHA_LATER = "f" * 40  # ... and a lexicographically larger commit that is also cached


def _table(tokenizer, answer: str = "46") -> pa.Table:
    prompts = ["What is 12 + 34?", "Reverse the word 'hello':"]
    chosen, rejected = [f" {answer}", " olleh"], [" 47", " hello"]
    return pa.table({
        "row": pa.array([0, 1], pa.int64()),
        "prompt_ids": [tokenizer.encode(p, add_special_tokens=False) for p in prompts],
        "chosen_ids": [tokenizer.encode(c, add_special_tokens=False) for c in chosen],
        "rejected_ids": [tokenizer.encode(r, add_special_tokens=False) for r in rejected],
    })


def _key(reference, tokenizer, table, truncation=TRUNCATION, **kwargs) -> str:
    return rc.cache_key(str(reference), tokenizer, table, truncation, **kwargs)


def _fake_hub_cache(root: Path, repo_id: str, model_dir: Path, snapshots: dict[str, Path], main: str) -> Path:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/files}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for commit, source in snapshots.items():
        shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(main)
    return root


def _perturbed_copy(model_dir: Path, destination: Path) -> Path:
    """The model with one weight changed (same config, same tokenizer)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, destination)
    weights = load_file(destination / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, destination / "model.safetensors", metadata={"format": "pt"})
    assert not torch.equal(weights[name], load_file(model_dir / "model.safetensors")[name])
    return destination


def test_every_input_that_changes_the_numbers_changes_the_key(tiny_model_dir, tiny_tokenizer, tmp_path):
    table = _table(tiny_tokenizer)
    base = _key(tiny_model_dir, tiny_tokenizer, table)

    # unchanged inputs (equal values, fresh objects, another spelling of the dtype) → the same key
    assert _key(tiny_model_dir, tiny_tokenizer, _table(tiny_tokenizer), dict(TRUNCATION)) == base
    assert _key(tiny_model_dir, copy.deepcopy(tiny_tokenizer), table, dtype="float32", attn_implementation=None,
                trust_remote_code=False) == base
    import torch

    assert _key(tiny_model_dir, tiny_tokenizer, table, dtype=torch.float32) == base
    assert _key(tiny_model_dir, tiny_tokenizer, table, dtype="bf16") == _key(tiny_model_dir, tiny_tokenizer, table,
                                                                             dtype=torch.bfloat16)
    # the same files elsewhere are the same model; files that do not change log-probs are not keyed
    moved = Path(shutil.copytree(tiny_model_dir, tmp_path / "moved"))
    assert _key(moved, tiny_tokenizer, table) == base
    (moved / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    (moved / "modeling_custom.py").write_text("# remote code, ignored unless trusted\n")
    assert _key(moved, tiny_tokenizer, table) == base

    changed = {
        "dtype": _key(tiny_model_dir, tiny_tokenizer, table, dtype="bfloat16"),
        "attn_implementation": _key(tiny_model_dir, tiny_tokenizer, table, attn_implementation="eager"),
        "trust_remote_code": _key(tiny_model_dir, tiny_tokenizer, table, trust_remote_code=True),
        "max_length": _key(tiny_model_dir, tiny_tokenizer, table, {**TRUNCATION, "max_length": 48}),
        "max_prompt_length": _key(tiny_model_dir, tiny_tokenizer, table, {**TRUNCATION, "max_prompt_length": 16}),
        "truncation_mode": _key(tiny_model_dir, tiny_tokenizer, table, {**TRUNCATION, "truncation_mode": "keep_start"}),
        "token ids": _key(tiny_model_dir, tiny_tokenizer, _table(tiny_tokenizer, answer="64")),
        "weights": _key(_perturbed_copy(tiny_model_dir, tmp_path / "perturbed"), tiny_tokenizer, table),
    }
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    changed["tokenizer"] = _key(tiny_model_dir, tokenizer, table)
    config_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "config"))
    config = json.loads((config_dir / "config.json").read_text())
    (config_dir / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    changed["model config"] = _key(config_dir, tiny_tokenizer, table)
    # trusted remote code computes the numbers: its source is part of the model then
    trusted = _key(moved, tiny_tokenizer, table, trust_remote_code=True)
    (moved / "modeling_custom.py").write_text("# remote code, changed\n")
    changed["remote code"] = _key(moved, tiny_tokenizer, table, trust_remote_code=True)
    assert changed["remote code"] != trusted

    assert base not in changed.values(), [k for k, v in changed.items() if v == base]
    assert len(set(changed.values())) == len(changed), changed


def test_hub_reference_is_keyed_on_the_commit_actually_loaded(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    """refs/main decides, not the largest cached commit hash; transformers loads that same commit."""
    import huggingface_hub
    from huggingface_hub import constants

    other = _perturbed_copy(tiny_model_dir, tmp_path / "other")
    cache = _fake_hub_cache(tmp_path / "hub", "org/tiny", tiny_model_dir,
                            {SHA_MAIN: tiny_model_dir, SHA_LATER: other}, main=SHA_MAIN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    assert rc.resolve_hub_revision("org/tiny") == SHA_MAIN
    assert rc.resolve_model("org/tiny") == (f"org/tiny@{SHA_MAIN}", SHA_MAIN)
    # the weights transformers actually loads (offline) are that commit's, not the larger hash's
    from safetensors.torch import load_file

    from alphadpo_ray.ml.models import load_model

    state = load_model("org/tiny", cache_dir=str(cache)).state_dict()
    snapshots = cache / "models--org--tiny" / "snapshots"
    main, later = (load_file(snapshots / sha / "model.safetensors") for sha in (SHA_MAIN, SHA_LATER))
    differing = [k for k in main if not main[k].equal(later[k])]
    assert differing and all(state[k].equal(main[k]) for k in differing)

    table = _table(tiny_tokenizer)
    first = _key("org/tiny", tiny_tokenizer, table)
    assert _key("org/tiny", tiny_tokenizer, table) == first
    (cache / "models--org--tiny" / "refs" / "main").write_text(SHA_LATER)  # main moved on
    assert rc.resolve_hub_revision("org/tiny") == SHA_LATER
    assert _key("org/tiny", tiny_tokenizer, table) != first
    # a pinned commit is itself; a repo the cache does not know is the id alone (and nothing pinned)
    assert rc.resolve_hub_revision("org/tiny", revision=SHA_MAIN) == SHA_MAIN
    assert rc.resolve_model("org/unknown") == ("org/unknown", None)

    # online, the Hub's answer wins over the cache; an unreachable Hub falls back to the cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    online = "a" * 40
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, **_: str(cache / "x" / "snapshots" / online / filename))
    assert rc.resolve_hub_revision("org/tiny") == online

    def unreachable(*_, **__):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    assert rc.resolve_hub_revision("org/tiny") == SHA_LATER


def test_scoring_uses_the_policy_load_settings_and_dtype_is_keyed(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                   monkeypatch):
    """A bf16 cache is not reused by a float32 run; scoring loads with attn_implementation /
    trust_remote_code / the pinned revision (scored in-process, as a one-worker run does)."""
    from alphadpo_ray.ml import models

    loads = []
    real_load = models.load_model

    def recording_load(path, dtype, eval_mode=False, **kwargs):
        model = real_load(path, dtype=dtype, eval_mode=eval_mode, **kwargs)
        loads.append({"dtype": model.dtype, "attn": model.config._attn_implementation, **kwargs})
        return model

    monkeypatch.setattr(models, "load_model", recording_load)
    table = _table(tiny_tokenizer)
    common = {"reference": str(tiny_model_dir), "tokenizer": tiny_tokenizer, "truncation": TRUNCATION,
              "storage_path": str(tmp_path / "storage"), "in_process": True}

    bf16 = rc.ensure_reference_cache(table, dtype="bfloat16", attn_implementation="eager", **common)
    assert not bf16.hit
    assert str(loads[-1]["dtype"]) == "torch.bfloat16"
    assert loads[-1]["attn"] == "eager" and loads[-1]["trust_remote_code"] is False and "revision" not in loads[-1]
    assert rc.ensure_reference_cache(table, dtype="bf16", attn_implementation="eager", **common).hit

    fp32 = rc.ensure_reference_cache(table, dtype="float32", attn_implementation="eager", **common)
    assert not fp32.hit and fp32.key != bf16.key and fp32.uri != bf16.uri
    assert str(loads[-1]["dtype"]) == "torch.float32"
    sdpa = rc.ensure_reference_cache(table, dtype="float32", attn_implementation="sdpa", **common)
    assert not sdpa.hit and sdpa.key != fp32.key and loads[-1]["attn"] == "sdpa"
    meta = json.loads(Path(fp32.uri.removesuffix(".parquet") + ".json").read_text())
    assert meta["dtype"] == "float32" and meta["attn_implementation"] == "eager" and meta["revision"] is None
    assert len(loads) == 3  # the hit loaded nothing

    # a hub reference is scored at the commit its key names (refs/main of the fake hub cache)
    from huggingface_hub import constants

    cache = _fake_hub_cache(tmp_path / "hub", "org/tiny", tiny_model_dir,
                            {SHA_MAIN: tiny_model_dir, SHA_LATER: tiny_model_dir}, main=SHA_MAIN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub = rc.ensure_reference_cache(table, **{**common, "reference": "org/tiny"}, trust_remote_code=True)
    assert not hub.hit and loads[-1]["revision"] == SHA_MAIN and loads[-1]["trust_remote_code"] is True
    meta = json.loads(Path(hub.uri.removesuffix(".parquet") + ".json").read_text())
    assert meta["revision"] == SHA_MAIN and meta["reference_identity"] == f"org/tiny@{SHA_MAIN}"

    assert rc.load_kwargs("eager", True, SHA_MAIN) == {"trust_remote_code": True, "attn_implementation": "eager",
                                                       "revision": SHA_MAIN}
    assert rc.load_kwargs() == {"trust_remote_code": False}
