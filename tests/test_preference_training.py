"""The issue's "must show": a few hundred optimiser steps of alpha-dpo on the built-in task, starting
from its SFT reference, lift held-out preference accuracy far above the reference's and move the policy
away from it (KL > 0).

The loop is plain PyTorch in one process, built only from the package's own pieces (models, data,
sequence_logps, build_loss, held_out_metrics); the package has no second trainer. As in the project's
design, the reference log-probs of the training pairs are computed once up front, without grad, and
reused by every step.
"""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from alphadpo_ray.ml.data import collate_pairs, preference_data_from_rows, tokenize_pairs
from alphadpo_ray.ml.logprobs import sequence_logps
from alphadpo_ray.ml.losses import build_loss
from alphadpo_ray.ml.models import load_model, load_tokenizer
from alphadpo_ray.training.sft import held_out_metrics

MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 96  # the SFT reference's defaults
STEPS, BATCH_PAIRS, LEARNING_RATE = 150, 16, 1e-4
HPARAMS = dict(beta=2.5, gamma_beta_ratio=0.3, alpha=0.2)


def with_reference_logps(examples: list[dict], reference, pad_token_id: int, batch_pairs: int = 100) -> list[dict]:
    """Each tokenised pair plus the reference's summed response log-probs (computed once, no grad)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_pairs):
            chunk = [dict(e) for e in examples[i : i + batch_pairs]]
            batch = collate_pairs(chunk, pad_token_id)
            logps = sequence_logps(reference, batch["input_ids"], batch["attention_mask"], batch["response_mask"]).logps
            n = len(chunk)
            for e, c, j in zip(chunk, logps[:n].tolist(), logps[n:].tolist()):
                e["ref_chosen_logps"], e["ref_rejected_logps"] = c, j
            out.extend(chunk)
    return out


@pytest.mark.timeout(600)
def test_alpha_dpo_lifts_held_out_accuracy_above_the_reference(builtin_task):
    start = time.perf_counter()
    tokenizer = load_tokenizer(builtin_task.reference_dir)
    reference = load_model(builtin_task.reference_dir, eval_mode=True)
    policy = load_model(builtin_task.reference_dir)
    rows = [json.loads(line) for line in builtin_task.train_file.read_text().splitlines() if line.strip()]
    dataset, _ = preference_data_from_rows(rows, name="builtin-train", chat_template=True, tokenizer=tokenizer)
    tokens = tokenize_pairs(dataset, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    examples = with_reference_logps(list(tokens), reference, tokenizer.pad_token_id)

    loss = build_loss("alpha-dpo", **HPARAMS)

    def evaluate(generation_samples: int) -> dict:
        return held_out_metrics(policy, reference, tokenizer, loss, builtin_task.held_out_file, MAX_LENGTH,
                                MAX_PROMPT_LENGTH, generation_samples=generation_samples)

    # Step 0: the policy is the reference. alpha-dpo's reward β(π̄ - α(π̄ - r̄)) reduces to βπ̄ there,
    # so its accuracy is the reference's own (recorded at build time with the same reward).
    initial = evaluate(generation_samples=0)
    reference_accuracy = builtin_task.reference_metrics["accuracy"]
    assert initial["accuracy"] == pytest.approx(reference_accuracy, abs=1e-9)
    assert initial["accuracy_logratio"] == 0.5 and initial["kl"] == pytest.approx(0.0, abs=1e-9)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    rng = random.Random(0)
    torch.manual_seed(0)
    policy.train()
    losses = []
    for _ in range(STEPS):
        batch = collate_pairs(rng.sample(examples, BATCH_PAIRS), tokenizer.pad_token_id)
        out = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        n = BATCH_PAIRS
        result = loss(out.logps[:n], out.logps[n:], batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                      out.lengths[:n], out.lengths[n:])
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(result.loss.item())

    final = evaluate(generation_samples=64)
    seconds = time.perf_counter() - start
    print(
        f"\nalpha-dpo {HPARAMS} lr={LEARNING_RATE} batch={BATCH_PAIRS} pairs, {STEPS} steps, {seconds:.1f} s: "
        f"held-out accuracy {reference_accuracy:.3f} -> {final['accuracy']:.3f}, accuracy_logratio "
        f"{final['accuracy_logratio']:.3f}, kl {final['kl']:.3f}, generation_accuracy "
        f"{builtin_task.reference_metrics['generation_accuracy']:.3f} -> {final['generation_accuracy']:.3f}"
    )

    # Thresholds. Held-out = 200 clean pairs; the reference sits near chance (0.51 measured; an estimate
    # at 0.5 has binomial sd ≈ 0.035 on 200 pairs). Requiring accuracy ≥ 0.8 and ≥ reference + 0.25 is
    # > 8 sd above chance, so it cannot pass by luck, while leaving a wide margin below what this exact
    # run measures (deterministic seeds; 0.815 after 25 steps, 0.975 after 100, 1.0 after 150).
    assert final["pairs"] == 200
    assert final["accuracy"] >= max(0.8, reference_accuracy + 0.25), final
    assert final["accuracy_logratio"] >= 0.8, final  # also on the method-independent scale
    # KL(πθ‖πref) summed over response tokens: exactly 0 at the start, ≈ 6.7 nats measured after 150 steps.
    # 0.01 only rules out a policy that never moved (e.g. an optimiser not wired to its parameters).
    assert final["kl"] > 0.01, final
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10  # the training loss itself went down
    state = loss.state_dict()
    assert state["step"] == STEPS and state["std"] > 0  # alpha-dpo's margin statistics were live
    assert all(not p.requires_grad for p in reference.parameters())
