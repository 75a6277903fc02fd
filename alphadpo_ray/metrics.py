"""Held-out metrics: what sweeps optimise and what `compare` ranks methods on.

For a policy πθ and its reference πref on held-out preference pairs:

* ``accuracy``: fraction of pairs whose chosen response gets the higher implicit reward *of the
  method being trained* (each method defines its reward differently, see ``alphadpo_ray.losses``,
  so this does not compare across methods);
* ``accuracy_logratio``: the same with the method-independent reward log πθ(y|x)/πref(y|x) of the
  summed log-probs, so methods compare on one scale. Ties count ½ in both, so the reference itself
  scores exactly 0.5;
* ``kl``: exact KL(πθ‖πref) over the vocabulary, summed over response tokens and averaged over the
  held-out chosen and rejected responses; ``kl_per_token`` divides by their token count;
* reward margins and means, mean per-token log-probs of chosen/rejected responses, and the eval loss;
* ``generation_accuracy`` (built-in task only): greedy decoding scored by the task's checker.

Every function here accumulates *sums* and reduces them across data-parallel workers with one
all-reduce when a process group exists, so each worker can evaluate its own shard.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import distributed
from .logprobs import sequence_logps
from .losses import PreferenceLoss

_SUMS = (
    "pairs", "acc", "acc_logratio", "kl", "kl_tokens", "tokens_chosen", "tokens_rejected",
    "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected", "loss", "ref_pairs",
)


def _lockstep(items: list):
    """Yield (item, real) so every worker runs the same number of steps.

    ZeRO-3 forward passes are collective (each layer's parameters are all-gathered), so a worker whose
    shard is shorter repeats its first item as filler; fillers are computed but not counted.
    """
    count = distributed.max_over_workers(len(items))
    for i in range(count):
        if i < len(items):
            yield items[i], True
        elif items:
            yield items[0], False
        else:
            raise RuntimeError("this worker's evaluation shard is empty; use at least one item per worker")


def _wins(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where chosen > rejected, ½ on ties, 0 otherwise; summed."""
    return (chosen > rejected).float().sum() + 0.5 * (chosen == rejected).float().sum()


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_preferences(
    policy,
    loss: PreferenceLoss,
    batches: list[dict],
    reference=None,
    chunk_size: int = 512,
) -> dict[str, float]:
    """Held-out preference metrics of `policy` over `batches` (collated pairs, see ``collate_pairs``).

    `reference` is the reference model: it gives the reference log-probs and the exact KL. Without
    it, batches must carry ``ref_chosen_logps``/``ref_rejected_logps`` for reference-based rewards,
    and ``kl`` is not reported. The loss is called with ``train=False``: AlphaDPO's running statistics
    are read, never updated, by evaluation.
    """
    device = _device_of(policy)
    was_training = policy.training
    policy.eval()
    sums = dict.fromkeys(_SUMS, 0.0)
    for batch, real in _lockstep(list(batches)):
        scored = _score_pairs(policy, reference, batch, device, chunk_size)  # collective: fillers too
        if real:
            _add_pair_sums(sums, loss, scored)
    totals = distributed.all_reduce(torch.tensor([sums[k] for k in _SUMS], dtype=torch.float64))
    policy.train(was_training)
    return _metrics_from_sums(dict(zip(_SUMS, totals.tolist())))


def _score_pairs(policy, reference, batch: dict, device, chunk_size: int) -> dict:
    """Policy (and reference) log-probs, lengths and KL of one batch of pairs, split chosen/rejected."""
    ids = batch["input_ids"].to(device)
    out = sequence_logps(policy, ids, batch["attention_mask"].to(device), batch["response_mask"].to(device),
                         chunk_size=chunk_size, reference=reference)
    n = ids.shape[0] // 2
    if out.ref_logps is not None:
        rc, rj = out.ref_logps[:n], out.ref_logps[n:]
    elif "ref_chosen_logps" in batch:
        rc, rj = batch["ref_chosen_logps"].to(device), batch["ref_rejected_logps"].to(device)
    else:
        rc = rj = None
    return {"pc": out.logps[:n], "pj": out.logps[n:], "rc": rc, "rj": rj, "lc": out.lengths[:n],
            "lj": out.lengths[n:], "kl": out.kl, "n": n}


def _add_pair_sums(sums: dict, loss: PreferenceLoss, b: dict) -> None:
    """Add one scored batch to the running sums (see ``_SUMS``)."""
    pc, pj, rc, rj, lc, lj, n = b["pc"], b["pj"], b["rc"], b["rj"], b["lc"], b["lj"], b["n"]
    result = loss(pc, pj, rc, rj, lc, lj, train=False)
    sums["pairs"] += n
    sums["loss"] += float(result.loss) * n
    sums["acc"] += float(_wins(result.chosen_rewards, result.rejected_rewards))
    sums["margin"] += float((result.chosen_rewards - result.rejected_rewards).sum())
    sums["reward_chosen"] += float(result.chosen_rewards.sum())
    sums["reward_rejected"] += float(result.rejected_rewards.sum())
    sums["logp_chosen"] += float((pc / lc).sum())
    sums["logp_rejected"] += float((pj / lj).sum())
    sums["tokens_chosen"] += float(lc.sum())
    sums["tokens_rejected"] += float(lj.sum())
    if rc is not None:
        sums["acc_logratio"] += float(_wins(pc - rc, pj - rj))
        sums["ref_pairs"] += n
    if b["kl"] is not None:
        sums["kl"] += float(b["kl"].sum())
        sums["kl_tokens"] += float(lc.sum() + lj.sum())


def _metrics_from_sums(s: dict) -> dict[str, float]:
    """Means over pairs (and tokens) of the summed metrics of every worker."""
    pairs = max(s["pairs"], 1.0)
    metrics = {
        "accuracy": s["acc"] / pairs,
        "reward_margin": s["margin"] / pairs,
        "reward_chosen": s["reward_chosen"] / pairs,
        "reward_rejected": s["reward_rejected"] / pairs,
        "logps_chosen": s["logp_chosen"] / pairs,
        "logps_rejected": s["logp_rejected"] / pairs,
        "loss": s["loss"] / pairs,
        "pairs": int(s["pairs"]),
    }
    if s["ref_pairs"] > 0:
        metrics["accuracy_logratio"] = s["acc_logratio"] / s["ref_pairs"]
    if s["kl_tokens"] > 0:
        metrics["kl"] = s["kl"] / (2 * pairs)
        metrics["kl_per_token"] = s["kl"] / s["kl_tokens"]
    return metrics


@torch.no_grad()
def generation_accuracy(
    model,
    tokenizer,
    prompts: list[tuple[list[int], str]],
    checker: Callable[[str, str], bool],
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> dict[str, float]:
    """Greedy-decode each (prompt_ids, prompt_text) and score the text with `checker(prompt, response)`.

    In a data-parallel group every worker passes its own shard; shards are padded to the same number
    of batches (fillers are decoded but not scored) because ZeRO-3 generation is collective
    (``synced_gpus``): every worker must take part in every forward pass.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    correct = scored = 0
    for chunk, real in _lockstep(chunks):
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, _) in enumerate(chunk):  # left padding for decoder-only generation
            input_ids[i, width - len(ids):] = torch.as_tensor(ids)
            attention[i, width - len(ids):] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=distributed.is_distributed(),
        )
        if not real:
            continue
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for (_, prompt), text in zip(chunk, texts):
            correct += bool(checker(prompt, text))
            scored += 1
    totals = distributed.all_reduce(torch.tensor([correct, scored], dtype=torch.float64)).tolist()
    model.train(was_training)
    return {"generation_accuracy": totals[0] / max(totals[1], 1.0), "generation_samples": int(totals[1])}
