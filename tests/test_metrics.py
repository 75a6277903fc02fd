"""Held-out metrics: ties, method-specific accuracy, exact KL, read-only evaluation of alpha-dpo,
generation accuracy and length, sampled KL, and the data-parallel reduction over uneven shards
(2 gloo processes)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch

from alphadpo_ray.ml.logprobs import sequence_logps
from alphadpo_ray.ml.losses import build_loss
from alphadpo_ray.ml.metrics import evaluate_preferences, generation_accuracy, sampled_kl
from alphadpo_ray.ml.models import load_model, load_tokenizer
from alphadpo_ray.ml.task import TaskConfig, generate

# alphadpo_ray.ml.data (datasets, pyarrow) is imported inside the tests: the spawned workers of the
# distributed test import this module and do not need it.

SIZES = (3, 4, 2, 3)  # pairs per batch: uneven on purpose


@pytest.fixture(scope="module")
def tokens(tiny_tokenizer):
    from alphadpo_ray.ml.data import preference_data_from_rows, tokenize_pairs

    train, _ = generate(TaskConfig(train_size=sum(SIZES), held_out_size=1, length_bias=0.5, seed=11))
    dataset, _ = preference_data_from_rows(train, chat_template=True, tokenizer=tiny_tokenizer)
    tokenized = tokenize_pairs(dataset, tiny_tokenizer, max_length=96, max_prompt_length=48)
    return [tokenized[i] for i in range(len(tokenized))], [row["prompt"] for row in dataset]


@pytest.fixture(scope="module")
def batches(tokens, tiny_tokenizer):
    from alphadpo_ray.ml.data import collate_pairs

    examples, _ = tokens
    out, start = [], 0
    for size in SIZES:
        out.append(collate_pairs(examples[start : start + size], tiny_tokenizer.pad_token_id))
        start += size
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_model(tiny_model_dir, eval_mode=True)


def perturbed(model_dir, scale=0.05, seed=0):
    """A policy that differs from the reference: its weights plus Gaussian noise."""
    policy = load_model(model_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return policy


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return perturbed(tiny_model_dir)


def trained_alpha_loss():
    """alpha-dpo whose running statistics are non-trivial (two training calls on fixed numbers)."""
    loss = build_loss("alpha-dpo", beta=2.5, gamma_beta_ratio=0.3, alpha=0.2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        pc, pj, rc, rj = (-10 * torch.rand(6, generator=gen, dtype=torch.float64) for _ in range(4))
        loss(pc, pj, rc, rj, torch.full((6,), 5.0), torch.full((6,), 7.0))
    assert loss.state_dict()["std"] > 0
    return loss


# ---------------------------------------------------------------- ties, method-specific accuracy


def test_reference_against_itself_scores_exactly_one_half_and_zero_kl(reference, batches):
    for loss in (build_loss("simpo", beta=1.0, gamma_beta_ratio=0.0), build_loss("dpo", beta=0.1),
                 trained_alpha_loss()):
        metrics = evaluate_preferences(reference, loss, batches, reference=reference)
        assert metrics["accuracy_logratio"] == 0.5  # every log-ratio reward is exactly 0: all ties
        assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)
        assert metrics["kl_per_token"] == pytest.approx(0.0, abs=1e-7)
        assert metrics["pairs"] == sum(SIZES)
    dpo = evaluate_preferences(reference, build_loss("dpo", beta=0.1), batches, reference=reference)
    assert dpo["accuracy"] == 0.5 and dpo["reward_margin"] == 0.0  # dpo's reward is the log-ratio


def test_identical_responses_are_ties_for_every_method(policy, reference, tokens, tiny_tokenizer):
    from alphadpo_ray.ml.data import collate_pairs

    examples, _ = tokens
    same = [{**e, "rejected_ids": e["chosen_ids"]} for e in examples[:5]]
    batch = collate_pairs(same, tiny_tokenizer.pad_token_id)
    for loss in (build_loss("dpo", beta=0.1), build_loss("simpo", beta=2.0, gamma_beta_ratio=0.5),
                 build_loss("ipo", beta=0.1), trained_alpha_loss()):
        metrics = evaluate_preferences(policy, loss, [batch], reference=reference)
        assert metrics["accuracy"] == 0.5, loss
        assert metrics["accuracy_logratio"] == 0.5
        assert metrics["reward_margin"] == 0.0


def test_accuracy_uses_the_methods_own_rewards(policy, batches):
    """Reference log-probs carried by the batches are set by hand so that dpo's reward (the log-ratio)
    says the opposite of simpo's (the policy's length-normalised log-prob), with one exact tie."""
    pc, pj, lc, lj = [], [], [], []
    for batch in batches:
        out = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        n = batch["input_ids"].shape[0] // 2
        pc.append(out.logps[:n]), pj.append(out.logps[n:]), lc.append(out.lengths[:n]), lj.append(out.lengths[n:])
    pc, pj, lc, lj = (torch.cat(x).detach() for x in (pc, pj, lc, lj))
    simpo_wins = pc / lc > pj / lj
    n_pairs = len(pc)
    # dpo reward gap (pc - rc) - (pj - rj): +1 where simpo loses, -1 where it wins, exactly 0 for pair 0
    rc, rj = pc.clone(), pj.clone()
    rc[1:] = torch.where(simpo_wins[1:], pc[1:] + 1.0, pc[1:] - 1.0)
    with_refs, start = [], 0
    for batch in batches:
        n = batch["input_ids"].shape[0] // 2
        refs = {"ref_chosen_logps": rc[start : start + n], "ref_rejected_logps": rj[start : start + n]}
        with_refs.append({**batch, **refs})
        start += n

    dpo = evaluate_preferences(policy, build_loss("dpo", beta=0.1), with_refs)
    simpo = evaluate_preferences(policy, build_loss("simpo", beta=2.0, gamma_beta_ratio=0.0), with_refs)
    expected_dpo = (float((~simpo_wins[1:]).sum()) + 0.5) / n_pairs
    expected_simpo = float(simpo_wins.float().sum()) / n_pairs
    assert dpo["accuracy"] == pytest.approx(expected_dpo, abs=1e-12)
    assert simpo["accuracy"] == pytest.approx(expected_simpo, abs=1e-12)
    assert dpo["accuracy"] != simpo["accuracy"]
    # the method-independent log-ratio accuracy is the same whatever the loss
    assert dpo["accuracy_logratio"] == simpo["accuracy_logratio"] == pytest.approx(expected_dpo, abs=1e-12)
    assert "kl" not in dpo  # no reference model: no KL
    assert simpo["logps_chosen"] == pytest.approx(float((pc / lc).mean()), rel=1e-5)

    # reference-free method without any reference log-probs: no log-ratio accuracy
    free = evaluate_preferences(policy, build_loss("simpo", beta=2.0, gamma_beta_ratio=0.0), batches)
    assert free["accuracy"] == simpo["accuracy"] and "accuracy_logratio" not in free and "kl" not in free


# ---------------------------------------------------------------- exact KL


def direct_kl(policy, reference, batches):
    """Per-sequence KL(πθ‖πref) over the full vocabulary, summed over response tokens, from full logits."""
    per_seq, tokens = [], 0
    with torch.no_grad():
        for b in batches:
            ids, attention = b["input_ids"], b["attention_mask"]
            lp, lq = (
                torch.log_softmax(m(input_ids=ids, attention_mask=attention).logits[:, :-1].double(), -1)
                for m in (policy, reference)
            )
            mask = (b["response_mask"][:, 1:] & attention[:, 1:].bool()).double()
            kl_tok = (lp.exp() * (lp - lq)).sum(-1)
            per_seq.append((kl_tok * mask).sum(-1))
            tokens += int(mask.sum())
    per_seq = torch.cat(per_seq)
    return float(per_seq.mean()), float(per_seq.sum()) / tokens


def test_kl_is_positive_for_a_perturbed_policy_and_equals_the_full_vocabulary_computation(policy, reference, batches):
    metrics = evaluate_preferences(policy, build_loss("dpo", beta=0.1), batches, reference=reference)
    kl, kl_per_token = direct_kl(policy, reference, batches)
    assert kl > 1e-3
    assert metrics["kl"] == pytest.approx(kl, rel=1e-4)
    assert metrics["kl_per_token"] == pytest.approx(kl_per_token, rel=1e-4)


def test_evaluation_restores_the_training_mode(policy, reference, batches):
    policy.train()
    evaluate_preferences(policy, build_loss("dpo", beta=0.1), batches[:1], reference=reference)
    assert policy.training
    policy.eval()
    evaluate_preferences(policy, build_loss("dpo", beta=0.1), batches[:1], reference=reference)
    assert not policy.training


# ---------------------------------------------------------------- evaluation never updates alpha-dpo's state


def test_evaluation_does_not_change_alpha_dpo_state(policy, reference, batches):
    loss = trained_alpha_loss()
    before = loss.state_dict()
    first = evaluate_preferences(policy, loss, batches, reference=reference)
    second = evaluate_preferences(policy, loss, batches, reference=reference)
    assert loss.state_dict() == before
    assert first == second  # reading the same statistics twice gives the same numbers

    fresh = build_loss("alpha-dpo", beta=2.5, gamma_beta_ratio=0.3, alpha=0.2)
    metrics = evaluate_preferences(policy, fresh, batches, reference=reference)
    assert fresh.state_dict() == {"mean": 0.0, "std": 0.0, "step": 0}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


# ---------------------------------------------------------------- generation accuracy


def test_generation_accuracy_counts_and_scores(reference, tokens, tiny_tokenizer):
    examples, texts = tokens
    prompts = [(examples[i]["prompt_ids"], texts[i]) for i in range(5)]
    kwargs = dict(max_new_tokens=4, batch_size=2)  # 3 batches, the last one partial
    always = generation_accuracy(reference, tiny_tokenizer, prompts, lambda p, r: True, **kwargs)
    assert always["generation_accuracy"] == 1.0 and always["generation_samples"] == 5
    never = generation_accuracy(reference, tiny_tokenizer, prompts, lambda p, r: False, **kwargs)
    assert never["generation_accuracy"] == 0.0 and never["generation_samples"] == 5

    seen = []
    result = generation_accuracy(reference, tiny_tokenizer, prompts,
                                 lambda p, r: seen.append((p, r)) or p == texts[1], **kwargs)
    assert result["generation_accuracy"] == 0.2 and result["generation_samples"] == 5
    assert 1 <= result["generated_length"] <= 4
    assert [p for p, _ in seen] == texts[:5]
    # the scored text is only the continuation (greedy, at most 4 tokens), never the prompt
    longest = max(range(5), key=lambda i: len(prompts[i][0]))
    ids = torch.tensor([prompts[longest][0]])
    alone = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                               pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    assert seen[longest][1] == tiny_tokenizer.decode(alone[0, ids.shape[1]:], skip_special_tokens=True)
    assert "<|user|>" not in seen[longest][1] and texts[longest] not in seen[longest][1]


class ScriptedGenerator(torch.nn.Module):
    """A stand-in model whose `generate` appends the next rows of `script` to the prompts it is given."""

    def __init__(self, script: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the metrics a device
        self.script, self.used = script, 0

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = self.script[self.used : self.used + len(input_ids), :max_new_tokens]
        self.used += len(input_ids)
        return torch.cat([input_ids, rows], dim=1)


def test_generated_length_counts_tokens_up_to_and_including_eos(tokens, tiny_tokenizer):
    """The tiny tokenizer pads with <pad> (0) and ends with </s> (2); a model whose pad token is its EOS
    pads with more EOS. Length stops at the first EOS whichever way the row is padded."""
    examples, texts = tokens
    prompts = [(examples[i]["prompt_ids"], texts[i]) for i in range(4)]
    pad, eos, a, b = tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id, 40, 41
    script = torch.tensor([[a, b, eos, pad, pad, pad],   # 3: EOS counts, padding does not
                           [a, eos, eos, eos, eos, eos],  # 2: padded with EOS (pad token = EOS models)
                           [a, b, a, b, a, b],            # 6: no EOS within max_new_tokens
                           [eos, pad, pad, pad, pad, pad]])  # 1: EOS at once
    result = generation_accuracy(ScriptedGenerator(script), tiny_tokenizer, prompts, lambda p, r: True,
                                 max_new_tokens=6, batch_size=3)  # two batches: 3 + 1
    assert result["generated_length"] == (3 + 2 + 6 + 1) / 4
    assert result["generation_samples"] == 4


# ---------------------------------------------------------------- sampled KL


@pytest.fixture(scope="module")
def sft_prompts(builtin_task):
    """Held-out prompts of the built-in task and its SFT reference's tokenizer (responses end in EOS)."""
    import json

    from alphadpo_ray.ml.data import preference_data_from_rows, tokenize_pairs

    tokenizer = load_tokenizer(builtin_task.reference_dir)
    rows = [json.loads(line) for line in builtin_task.held_out_file.read_text().splitlines()[:8]]
    dataset, _ = preference_data_from_rows(rows, chat_template=True, tokenizer=tokenizer)
    tokenized = tokenize_pairs(dataset, tokenizer, max_length=256, max_prompt_length=128)
    return [tokenized[i]["prompt_ids"] for i in range(len(tokenized))], tokenizer


def sampling_kwargs(tokenizer, max_new_tokens=24):
    return dict(max_new_tokens=max_new_tokens, batch_size=64, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id)


def test_sampled_kl_of_the_reference_against_itself_is_exactly_zero(builtin_task, sft_prompts):
    prompts, tokenizer = sft_prompts
    policy, reference = (load_model(builtin_task.reference_dir, eval_mode=True) for _ in range(2))
    result = sampled_kl(policy, reference, prompts, samples_per_prompt=3, **sampling_kwargs(tokenizer))
    assert result == {"kl_sampled": 0.0, "kl_sampled_se": 0.0, "kl_sampled_samples": 24}


def test_sampled_kl_of_a_policy_with_non_finite_weights_is_nan_not_a_crash(builtin_task, sft_prompts):
    """A diverging trial can be evaluated after its weights went inf/NaN and before its loss does: the
    evaluation reports NaN (the NaN loss that follows stops the trial with its reason)."""
    import math

    prompts, tokenizer = sft_prompts
    policy, reference = (load_model(builtin_task.reference_dir, eval_mode=True) for _ in range(2))
    with torch.no_grad():
        next(policy.parameters()).fill_(float("nan"))
    result = sampled_kl(policy, reference, prompts[:2], **sampling_kwargs(tokenizer))
    assert math.isnan(result["kl_sampled"]) and result["kl_sampled_samples"] == 2


def rao_blackwellised_kl(policy, reference, prompts, tokenizer, samples_per_prompt, seed):
    """Exact sequence-level KL(πθ‖πref), estimated with low variance from independent policy samples.

    KL(πθ‖πref) over whole responses (stopped at EOS or max_new_tokens) is E_y~πθ Σ_t log πθ(y_t|y<t) −
    log πref(y_t|y<t). Taking the expectation of each term over y_t given y<t (whether step t happens
    is decided by y<t) turns it into E_y~πθ Σ_t KL(πθ(·|y<t) ‖ πref(·|y<t)): the same quantity, with
    the token sampling noise integrated out exactly over the vocabulary. `sequence_logps(...).kl` is
    that per-position exact KL summed over the response tokens (EOS included)."""
    from alphadpo_ray.ml.metrics import _left_padded, _prompt_response_batch, _response_lengths

    items = [p for p in prompts for _ in range(samples_per_prompt)]
    kls = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i in range(0, len(items), 64):
            chunk = items[i : i + 64]
            ids, attention = _left_padded(chunk, tokenizer.pad_token_id)
            out = policy.generate(input_ids=ids, attention_mask=attention, max_new_tokens=24, do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
            generated = out[:, ids.shape[1]:]
            batch = _prompt_response_batch(chunk, generated, _response_lengths(generated, tokenizer.eos_token_id),
                                           tokenizer.pad_token_id)
            kls.append(sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                      reference=reference).kl.double())
    kls = torch.cat(kls)
    return float(kls.mean()), float(kls.std() / len(kls) ** 0.5)


@pytest.mark.timeout(300)
def test_sampled_kl_matches_the_exact_kl_of_a_perturbed_policy_within_its_standard_error(builtin_task, sft_prompts):
    """Policy = the SFT reference + N(0, 0.02²) on every weight (seed 0). The sampled KL (400 responses)
    agrees with the exact KL (Rao-Blackwellised, 400 other responses) within 3 combined standard
    errors, which are small against the KL itself; the estimator with samples from the reference instead
    (E_y~πref log πθ/πref = −KL(πref‖πθ) < 0) is far outside them."""
    prompts, tokenizer = sft_prompts
    reference = load_model(builtin_task.reference_dir, eval_mode=True)
    policy = perturbed(builtin_task.reference_dir, scale=0.02, seed=0)
    kwargs = sampling_kwargs(tokenizer)
    policy.train()  # evaluation switches dropout off and restores the mode afterwards
    state = torch.get_rng_state()
    sampled = sampled_kl(policy, reference, prompts, samples_per_prompt=50, seed=1, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)  # training's RNG is left as it was
    assert policy.training
    exact, exact_se = rao_blackwellised_kl(policy.eval(), reference, prompts, tokenizer, 50, seed=2)

    assert sampled["kl_sampled_samples"] == 400
    assert exact > 10 * exact_se  # a clearly non-zero KL (its value moves with the SFT reference: 0.46 today)...
    tolerance = 3 * (sampled["kl_sampled_se"] ** 2 + exact_se**2) ** 0.5
    assert tolerance < exact / 2  # ...resolved well enough that a wrong estimator cannot hide in the noise
    assert abs(sampled["kl_sampled"] - exact) <= tolerance, (sampled, exact, exact_se)

    wrong = -sampled_kl(reference, policy, prompts, samples_per_prompt=50, seed=1, **kwargs)["kl_sampled"]
    assert abs(wrong - exact) > 3 * tolerance  # sampling from the reference measures something else

    again = sampled_kl(policy, reference, prompts, samples_per_prompt=50, seed=1, **kwargs)
    assert again == sampled  # seeded: the same numbers every time
    other = sampled_kl(policy, reference, prompts[:2], samples_per_prompt=5, seed=3, **kwargs)
    assert other["kl_sampled"] != sampled["kl_sampled"] and other["kl_sampled_samples"] == 10


# ---------------------------------------------------------------- data-parallel reduction (2 gloo processes)


def odd_prompt_checker(prompt: str, response: str) -> bool:
    """Deterministic in the prompt only, so shards score the same as one process whatever is generated."""
    return len(prompt) % 2 == 1


def _dist_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    tmp = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'init'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        data = torch.load(tmp / "data.pt")
        policy = load_model(tmp / "policy")
        reference = load_model(tmp / "reference", eval_mode=True)
        tokenizer = load_tokenizer(tmp / "reference")
        loss = build_loss("alpha-dpo", beta=2.5, gamma_beta_ratio=0.3, alpha=0.2)
        loss.load_state_dict(data["loss_state"])
        shard = data["batches"][:3] if rank == 0 else data["batches"][3:]  # 3 batches vs 1: lockstep fillers
        metrics = evaluate_preferences(policy, loss, shard, reference=reference)
        prompts = data["prompts"][:5] if rank == 0 else data["prompts"][5:]  # 3 chunks of 2 vs 1
        metrics.update(generation_accuracy(policy, tokenizer, prompts, odd_prompt_checker, max_new_tokens=3,
                                           batch_size=2))
        metrics["sampled"] = sampled_kl(policy, reference, [ids for ids, _ in prompts], max_new_tokens=3,
                                        batch_size=2, pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id)
        metrics["state_after"] = loss.state_dict()
        torch.save(metrics, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_distributed_evaluation_over_uneven_shards_matches_one_process(
    policy, reference, batches, tokens, tiny_model_dir, tiny_tokenizer, tmp_path
):
    import torch.multiprocessing as mp

    examples, texts = tokens
    prompts = [(examples[i]["prompt_ids"], texts[i]) for i in range(7)]
    loss = trained_alpha_loss()
    policy.save_pretrained(tmp_path / "policy", safe_serialization=True)
    reference.save_pretrained(tmp_path / "reference", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "reference")
    torch.save({"batches": batches, "prompts": prompts, "loss_state": loss.state_dict()}, tmp_path / "data.pt")

    mp.spawn(_dist_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    single = evaluate_preferences(policy, loss, batches, reference=reference)
    single.update(generation_accuracy(policy, tiny_tokenizer, prompts, odd_prompt_checker, max_new_tokens=3,
                                      batch_size=2))
    expected_generation = sum(odd_prompt_checker(p, "") for _, p in prompts) / len(prompts)
    assert single["generation_accuracy"] == expected_generation and single["generation_samples"] == 7
    for metrics in ranks:
        assert metrics.pop("state_after") == loss.state_dict()  # evaluation stays read-only on every worker
        sampled = metrics.pop("sampled")  # each worker samples with its own seed: not one process's numbers
        assert sampled["kl_sampled_samples"] == 7 and sampled["kl_sampled"] != 0 and sampled["kl_sampled_se"] > 0
        assert metrics["pairs"] == single["pairs"] == sum(SIZES)  # fillers are not counted
        assert metrics["generation_samples"] == 7
        assert set(metrics) == set(single)
        for key, value in single.items():
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert ranks[0] == ranks[1]  # the sums are all-reduced: every worker reports the same numbers
