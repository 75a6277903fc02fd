"""Held-out metrics: what sweeps optimise and what `compare` ranks methods on.

For a policy πθ and its reference πref on held-out preference pairs:

* ``accuracy``: fraction of pairs whose chosen response gets the higher implicit reward *of the
  method being trained* (each method defines its reward differently, see ``alphadpo_ray.ml.losses``,
  so this does not compare across methods);
* ``accuracy_logratio``: the same with the method-independent reward log πθ(y|x)/πref(y|x) of the
  summed log-probs, so methods compare on one scale. Ties count ½ in both, so the reference itself
  scores exactly 0.5;
* ``kl`` — the *exact teacher-forced KL on held-out responses*: KL(πθ‖πref) over the whole
  vocabulary at each position of the held-out chosen and rejected responses (which come from the
  data, not from πθ), summed over response tokens and averaged over responses; ``kl_per_token``
  divides by their token count. Cheap and exact, but on the data's responses, not the policy's own;
* ``kl_sampled`` — the *sampled KL*: the mean over responses y ~ πθ(·|x), sampled by the policy itself
  for held-out prompts x, of Σ_t log πθ(y_t|x,y<t) − log πref(y_t|x,y<t) (EOS included), an unbiased
  Monte-Carlo estimate of the sequence-level KL(πθ‖πref) as TDPO's and AlphaDPO's authors measure it;
  ``kl_sampled_se`` is its standard error (sample std / √n over all workers' samples);
* reward margins and means, mean per-token log-probs of chosen/rejected responses, and the eval loss;
* ``generation_accuracy`` (built-in task only): greedy decoding scored by the task's checker, with
  ``generated_length``, the mean tokens per greedy response (EOS included), so learned verbosity shows.

Every function here accumulates *sums* and reduces them across data-parallel workers with one
all-reduce when a process group exists, so each worker can evaluate its own shard.
"""

from __future__ import annotations

import math
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
    """Greedy-decode each (prompt_ids, prompt_text) and score the text with `checker(prompt, response)`;
    also the mean number of generated tokens per response (up to and including EOS, no padding).

    In a data-parallel group every worker passes its own shard; shards are padded to the same number
    of batches (fillers are decoded but not scored) because ZeRO-3 generation is collective
    (``synced_gpus``): every worker must take part in every forward pass.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    correct = scored = tokens = 0
    for chunk, real in _lockstep(chunks):
        input_ids, attention = _left_padded([ids for ids, _ in chunk], pad_id)
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
        generated = out[:, input_ids.shape[1]:].cpu()
        tokens += int(_response_lengths(generated, tokenizer.eos_token_id).sum())
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for (_, prompt), text in zip(chunk, texts):
            correct += bool(checker(prompt, text))
            scored += 1
    totals = distributed.all_reduce(torch.tensor([correct, scored, tokens], dtype=torch.float64)).tolist()
    model.train(was_training)
    samples = max(totals[1], 1.0)
    return {"generation_accuracy": totals[0] / samples, "generated_length": totals[2] / samples,
            "generation_samples": int(totals[1])}


# Sampling from the policy's own distribution: explicit values override both HF's global defaults
# (top_k=50) and whatever a checkpoint's generation_config sets (temperature, top_p, min_p, ...).
# remove_invalid_values: a policy whose weights went non-finite (a diverging trial, evaluated before its
# loss turns NaN) samples garbage instead of crashing in torch.multinomial; its sampled KL is then NaN,
# and the NaN loss that follows stops the trial with its reason. Finite and -inf logits are left as they are.
_POLICY_SAMPLING = dict(do_sample=True, num_beams=1, temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, min_p=0.0,
                        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, remove_invalid_values=True)


@torch.no_grad()
def sampled_kl(
    policy,
    reference,
    prompts: list[list[int]],
    *,
    samples_per_prompt: int = 1,
    max_new_tokens: int,
    batch_size: int,
    pad_token_id: int,
    eos_token_id: int | list[int],
    chunk_size: int = 512,
    seed: int = 0,
) -> dict[str, float]:
    """Sampled KL(πθ‖πref): sample responses to `prompts` (token ids) from `policy` itself (temperature
    1, no top-k/top-p truncation, at most `max_new_tokens`, stopping at EOS) and average
    Σ_t log πθ − log πref over their tokens (EOS included, padding after it not).

    Returns ``kl_sampled``, its Monte-Carlo standard error ``kl_sampled_se`` (sample std / √n) and
    ``kl_sampled_samples`` (n, over all workers). Sampling is seeded from (`seed`, worker rank) inside
    a fork of the RNG state, so the numbers are reproducible and the caller's RNG (training's
    dropout and data order) is left exactly as it was. Data-parallel and ZeRO-3 as
    `generation_accuracy`: each worker samples its own shard in lockstep; sums are all-reduced once.
    """
    device = _device_of(policy)
    was_training = policy.training
    policy.eval()
    items = [list(ids) for ids in prompts for _ in range(samples_per_prompt)]
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    sums = torch.zeros(3, dtype=torch.float64)  # n, Σx, Σx²
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed((seed * 1_000_003 + distributed.rank()) % 2**63)
        for chunk, real in _lockstep(chunks):
            input_ids, attention = _left_padded(chunk, pad_token_id)
            out = policy.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                  max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                  synced_gpus=distributed.is_distributed(), **_POLICY_SAMPLING)
            generated = out[:, input_ids.shape[1]:].cpu()
            batch = _prompt_response_batch(chunk, generated, _response_lengths(generated, eos_token_id), pad_token_id)
            scored = sequence_logps(policy, *(batch[k].to(device) for k in ("input_ids", "attention_mask",
                                    "response_mask")), chunk_size=chunk_size, reference=reference)  # collective
            if real:
                x = (scored.logps.double() - scored.ref_logps.double().to(scored.logps.device)).cpu()
                sums += torch.stack([torch.tensor(float(len(x)), dtype=torch.float64), x.sum(), (x * x).sum()])
    n, total, squares = distributed.all_reduce(sums).tolist()
    policy.train(was_training)
    mean = total / max(n, 1.0)
    variance = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return {"kl_sampled": mean, "kl_sampled_se": math.sqrt(variance / max(n, 1.0)), "kl_sampled_samples": int(n)}


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids and attention mask, left-padded as decoder-only generation needs."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
        attention[i, width - len(ids):] = 1
    return input_ids, attention


def _response_lengths(generated: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """Tokens of each generated row up to and including its first EOS (the whole row without one).
    Found from EOS, not from padding: the pad token is often the EOS token itself."""
    is_eos = torch.isin(generated, torch.as_tensor(eos_token_id, dtype=generated.dtype).flatten())
    first = is_eos.int().argmax(-1) + 1
    return torch.where(is_eos.any(-1), first, torch.full_like(first, generated.shape[1]))


def _prompt_response_batch(prompts: list[list[int]], generated: torch.Tensor, lengths: torch.Tensor,
                           pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response rows, as `sequence_logps` scores them (response_mask on the response)."""
    rows = [list(p) + generated[i, : int(lengths[i])].tolist() for i, p in enumerate(prompts)]
    width = max(len(r) for r in rows)
    batch = {k: torch.zeros((len(rows), width), dtype=torch.long) for k in ("input_ids", "attention_mask",
                                                                             "response_mask")}
    batch["input_ids"].fill_(pad_id)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        batch["input_ids"][i, : len(row)] = torch.as_tensor(row)
        batch["attention_mask"][i, : len(row)] = 1
        batch["response_mask"][i, len(prompt) : len(row)] = 1
    return batch
