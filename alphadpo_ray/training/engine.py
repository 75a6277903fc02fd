"""DeepSpeed engines for the policy (training) and the reference (evaluation only).

`deepspeed_config` turns the experiment config into a DeepSpeed config: ZeRO stage 0–3, optional
CPU offload of optimizer state / parameters, bf16 on GPU (fp32 on CPU with gloo), gradient
accumulation and clipping. Under ZeRO-3 models are created partitioned (`HfDeepSpeedConfig` is
alive while `from_pretrained` runs, so weights are never fully materialised on every worker).

Optimizer: ``deepspeed.optimizer: auto`` passes a `torch.optim.AdamW` instance on CPU (DeepSpeed's
own AdamW spends seconds building C++ helpers there) and lets DeepSpeed build its fused/CPU Adam on
GPU. The learning-rate schedule (warmup + cosine/linear/constant) is `transformers.get_scheduler`.
"""

from __future__ import annotations

import copy
import logging
import math

import torch

from .. import compat
from ..ml import distributed
from ..config.experiment import ExperimentConfig


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def use_deepspeed_optimizer(config: ExperimentConfig) -> bool:
    choice = config.deepspeed.optimizer
    return choice == "deepspeed" or (choice == "auto" and config.ray.use_gpu)


def deepspeed_config(config: ExperimentConfig) -> dict:
    """The DeepSpeed config of a run: the generated one with ``deepspeed.extra`` merged over it."""
    return _merge(_generated_config(config), config.deepspeed.extra)


def _generated_config(config: ExperimentConfig) -> dict:
    t, d = config.training, config.deepspeed
    zero: dict = {"stage": d.zero_stage}
    if d.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=config.ray.use_gpu)
    if d.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
        if d.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": config.ray.use_gpu}
    if d.offload_optimizer and d.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": config.ray.use_gpu}
    ds = {
        "train_batch_size": t.total_batch_size,
        "train_micro_batch_size_per_gpu": t.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if use_deepspeed_optimizer(config):
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.learning_rate, "weight_decay": t.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        }
    return ds


def _mask_strings(tree):
    if isinstance(tree, dict):
        return {k: _mask_strings(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_mask_strings(v) for v in tree]
    return "***" if isinstance(tree, str) else tree


def saved_deepspeed_config(config: ExperimentConfig) -> dict:
    """The copy of the DeepSpeed config that DeepSpeed writes into every checkpoint (``ds_config`` in
    ``*model_states.pt`` / ``*optim_states.pt``): `deepspeed_config` with every string that came from
    ``deepspeed.extra`` replaced by ``***``. ``extra`` is where credentials can hide (a monitor's API
    key, a URL with a password) under any name, so none of its strings is written; the engine itself
    runs on the full config, and the saved copy is a record only (loading a checkpoint never reads it;
    DeepSpeed's converters read its booleans, which are kept)."""
    return _merge(_generated_config(config), _mask_strings(config.deepspeed.extra))


def eval_deepspeed_config(config: ExperimentConfig) -> dict:
    """Inference-only config for the reference under ZeRO-3 (partitioned like the policy, no optimizer)."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": "auto"}
    if config.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": config.ray.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": config.training.per_device_eval_batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {k: v for k, v in zero.items() if v != "auto"},
        "bf16": {"enabled": config.training.bf16},
        "steps_per_print": 10**9,
    }


def quiet_logs() -> None:
    """DeepSpeed, Ray Train and transformers are chatty at INFO; keep the console to our progress lines."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor|.*all_gather_into_tensor")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    compat.quiet_train_report_logger(logging.WARNING)  # every report in full at INFO, from a logger of its own
    compat.import_deepspeed().utils.logger.setLevel(logging.WARNING)  # first import: without MLflow
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _dtype(config: ExperimentConfig) -> torch.dtype:
    return torch.bfloat16 if config.training.bf16 else torch.float32


def _from_pretrained(path: str, config: ExperimentConfig, ds_config: dict | None):
    """Load a causal LM; under ZeRO-3 (`ds_config` given) it is created already partitioned."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config is not None else None  # noqa: F841
    kwargs = {"dtype": _dtype(config), "trust_remote_code": config.model.trust_remote_code}
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = config.model.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, keep_alive


def build_policy_engine(config: ExperimentConfig, policy_path: str, total_steps: int):
    """(engine, hf_ds_config_handle): the policy wrapped by `deepspeed.initialize` with its optimizer
    and schedule. Keep the handle alive for the engine's lifetime under ZeRO-3."""
    import deepspeed
    from transformers import get_scheduler

    ds_config = deepspeed_config(config)
    model, handle = _from_pretrained(policy_path, config, ds_config if config.deepspeed.zero_stage == 3 else None)
    model.train()  # from_pretrained returns eval mode: no dropout and, silently, no gradient checkpointing
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    t = config.training
    warmup = math.ceil(t.warmup_ratio * total_steps)

    def schedule(optimizer):
        return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    if not config.ray.use_gpu:
        distributed.skip_cpu_comm_ops()  # whoever set up the process group: never JIT-build DeepSpeed's CPU comm op
    optimizer = None
    if not use_deepspeed_optimizer(config):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=None if optimizer else model.parameters(),
        lr_scheduler=schedule, config=ds_config,
    )
    # DeepSpeed has parsed `ds_config` into `engine._config`; `engine.config` (the raw dict) is only
    # written into checkpoints from here on, so it becomes the copy without deepspeed.extra's strings.
    engine.config = saved_deepspeed_config(config)
    return engine, handle


def load_reference(config: ExperimentConfig, reference_path: str, device: torch.device):
    """The frozen reference for evaluation: plain module on `device`, or a ZeRO-3 inference engine."""
    if config.deepspeed.zero_stage == 3:
        import deepspeed

        ds_config = eval_deepspeed_config(config)
        model, handle = _from_pretrained(reference_path, config, ds_config)
        model.eval().requires_grad_(False)
        engine = deepspeed.initialize(model=model, config=ds_config)[0]
        engine.eval()
        return engine.module, (engine, handle)
    model, _ = _from_pretrained(reference_path, config, None)
    return model.eval().requires_grad_(False).to(device), None


def release_reference(handle) -> None:
    """Free an evaluation reference from `load_reference`: a ZeRO-3 engine is destroyed (its hooks and
    partitioned parameters released); a plain module needs nothing beyond dropping the reference to it."""
    if handle is not None:
        engine, _hf_config = handle
        engine.destroy()


def consolidated_state_dict(engine, config: ExperimentConfig) -> dict | None:
    """Full policy weights on rank 0 (collective under ZeRO-3: every rank must call it)."""
    if config.deepspeed.zero_stage == 3:
        return compat.zero3_consolidated_state_dict(engine)
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
