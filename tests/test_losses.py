"""Preference losses: formulas on hand-computed cases, gradients, AlphaDPO's running statistics
(incl. gathering over 2 gloo processes), degenerate batches and build_loss validation."""

from __future__ import annotations

import ast
import datetime
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import alphadpo_ray.ml.losses as losses_mod
from alphadpo_ray.ml.losses import REQUIRED, LossOutput, PreferenceLoss, build_loss, method_hyperparameters, method_names

# Three pairs with explicit numbers: policy/reference summed log-probs and response lengths.
PC, PJ = [-10.0, -6.0, -8.0], [-12.0, -5.0, -9.0]
RC, RJ = [-11.0, -7.0, -8.5], [-11.5, -6.0, -9.5]
LC, LJ = [5, 3, 4], [6, 2, 3]

# The eight built-in methods (a test process may also hold plugin methods that configs of other tests loaded).
BUILTINS = ("alpha-dpo", "dpo", "simpo", "ipo", "cpo", "kto", "orpo", "r-dpo")
HPARAMS = {
    "alpha-dpo": dict(beta=2.5, gamma_beta_ratio=0.6, alpha=0.2),
    "dpo": dict(beta=0.1),
    "simpo": dict(beta=2.0, gamma_beta_ratio=0.5),
    "ipo": dict(beta=0.5),
    "cpo": dict(beta=0.1),
    "kto": dict(beta=0.1),
    "orpo": dict(beta=0.1),
    "r-dpo": dict(beta=0.1, length_alpha=0.05),
}


def T(values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def batch(dtype=torch.float64, grad=False):
    return (T(PC, dtype, grad), T(PJ, dtype, grad), T(RC, dtype, grad), T(RJ, dtype, grad),
            torch.tensor(LC), torch.tensor(LJ))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def norm(i):  # length-normalised log-probs of pair i: (π̄c, π̄j, r̄c, r̄j)
    return PC[i] / LC[i], PJ[i] / LJ[i], RC[i] / LC[i], RJ[i] / LJ[i]


def check(out: LossOutput, per_pair, loss, rew_c, rew_j):
    assert out.losses.tolist() == pytest.approx(per_pair, rel=1e-12, abs=1e-12)
    assert out.loss.item() == pytest.approx(loss, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx(rew_c, rel=1e-12, abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx(rew_j, rel=1e-12, abs=1e-12)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


# ---------------------------------------------------------------- formulas, hand-computed


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo(ls):
    b = 0.1
    d = [(PC[i] - RC[i]) - (PJ[i] - RJ[i]) for i in range(3)]
    per = [-(1 - ls) * logsig(b * x) - ls * logsig(-b * x) for x in d]
    out = build_loss("dpo", beta=b, label_smoothing=ls)(*batch())
    check(out, per, sum(per) / 3, [b * (PC[i] - RC[i]) for i in range(3)], [b * (PJ[i] - RJ[i]) for i in range(3)])
    assert out.metrics == {}


@pytest.mark.parametrize("ls", [0.0, 0.3])
def test_simpo(ls):
    b, g = 2.0, 0.5
    u = [PC[i] / LC[i] - PJ[i] / LJ[i] - g for i in range(3)]
    per = [-(1 - ls) * logsig(b * x) - ls * logsig(-b * x) for x in u]
    out = build_loss("simpo", beta=b, gamma_beta_ratio=g, label_smoothing=ls)(*batch())
    check(out, per, sum(per) / 3, [b * PC[i] / LC[i] for i in range(3)], [b * PJ[i] / LJ[i] for i in range(3)])


def test_simpo_and_other_reference_free_methods_accept_none_reference():
    pc, pj, _, _, lc, lj = batch()
    for m in ("simpo", "cpo", "orpo"):
        with_ref = build_loss(m, **HPARAMS[m])(*batch())
        without = build_loss(m, **HPARAMS[m])(pc, pj, None, None, lc, lj)
        assert torch.equal(with_ref.loss, without.loss)


def test_ipo():
    b = 0.5
    per, rc, rj = [], [], []
    for i in range(3):
        nc, nj, rnc, rnj = norm(i)
        per.append(((nc - nj) - (rnc - rnj) - 1 / (2 * b)) ** 2)
        rc.append(b * (nc - rnc))
        rj.append(b * (nj - rnj))
    check(build_loss("ipo", beta=b)(*batch()), per, sum(per) / 3, rc, rj)


@pytest.mark.parametrize("cpo_alpha", [1.0, 0.5, 0.0])
def test_cpo(cpo_alpha):
    b = 0.1
    per = [-logsig(b * (PC[i] - PJ[i])) for i in range(3)]
    nll = -sum(PC) / sum(LC)
    out = build_loss("cpo", beta=b, cpo_alpha=cpo_alpha)(*batch())
    check(out, per, sum(per) / 3 + cpo_alpha * nll, [b * x for x in PC], [b * x for x in PJ])
    assert out.metrics["nll"] == pytest.approx(nll)


@pytest.mark.parametrize("swap", [False, True])
def test_kto(swap):
    b = 0.1
    pc, pj, rc, rj = (RC, RJ, PC, PJ) if swap else (PC, PJ, RC, RJ)  # swapped: both KL estimates clamp to 0
    kl_c = max(0.0, sum(pc[i] - rc[i] for i in range(3)) / 3)
    kl_j = max(0.0, sum(pj[i] - rj[i] for i in range(3)) / 3)
    assert (kl_c > 0 and kl_j > 0) if not swap else (kl_c == 0 and kl_j == 0)
    per = [1 - sig(b * ((pc[i] - rc[i]) - kl_j)) for i in range(3)]
    per += [1 - sig(b * (kl_c - (pj[i] - rj[i]))) for i in range(3)]
    out = build_loss("kto", beta=b)(T(pc), T(pj), T(rc), T(rj), torch.tensor(LC), torch.tensor(LJ))
    check(out, per, sum(per) / 6, [b * (pc[i] - rc[i]) for i in range(3)], [b * (pj[i] - rj[i]) for i in range(3)])


def test_kto_kl_is_detached():
    pc, pj, rc, rj, lc, lj = batch(grad=True)
    build_loss("kto", beta=0.1)(pc, pj, rc, rj, lc, lj).loss.backward()
    b = 0.1
    kl_j = sum(PJ[i] - RJ[i] for i in range(3)) / 3
    # d/dπc_i of the mean over 6 of 1 - σ(b·(πc_i - rc_i - KLj)) is -b·σ'(x)/6, with no term through KLc.
    for i in range(3):
        s = sig(b * ((PC[i] - RC[i]) - kl_j))
        assert pc.grad[i].item() == pytest.approx(-b * s * (1 - s) / 6, rel=1e-12)


def test_orpo():
    b = 0.1
    per = []
    for i in range(3):
        nc, nj, _, _ = norm(i)
        log_odds = (nc - nj) - (math.log(1 - math.exp(nc)) - math.log(1 - math.exp(nj)))
        per.append(-b * logsig(log_odds))
    nll = -sum(PC) / sum(LC)
    out = build_loss("orpo", beta=b)(*batch())
    check(out, per, nll + sum(per) / 3, [b * PC[i] / LC[i] for i in range(3)], [b * PJ[i] / LJ[i] for i in range(3)])
    assert out.metrics["nll"] == pytest.approx(nll)


def test_r_dpo():
    b, a = 0.1, 0.05
    per = [-logsig(b * ((PC[i] - RC[i]) - (PJ[i] - RJ[i])) + a * (LC[i] - LJ[i])) for i in range(3)]
    out = build_loss("r-dpo", beta=b, length_alpha=a)(*batch())
    check(out, per, sum(per) / 3, [b * (PC[i] - RC[i]) for i in range(3)], [b * (PJ[i] - RJ[i]) for i in range(3)])


def alpha_expected(beta, gbr, alpha, ls=0.0, d=0.9, mean0=0.0, std0=0.0):
    """AlphaDPO on the module-level batch, by hand: (per-pair losses, new mean, new std, z)."""
    gaps = [(norm(i)[0] - norm(i)[1]) - (norm(i)[2] - norm(i)[3]) for i in range(3)]
    mean = d * mean0 + (1 - d) * statistics.fmean(gaps)
    std = d * std0 + (1 - d) * statistics.stdev(gaps)
    z = [(g - mean) / std for g in gaps]
    per = []
    for i in range(3):
        u = (norm(i)[0] - norm(i)[1]) - (alpha * z[i] + gbr)
        per.append(-(1 - ls) * logsig(beta * u) - ls * logsig(-beta * u))
    return per, mean, std, z


@pytest.mark.parametrize("ls,d", [(0.0, 0.9), (0.1, 0.5)])
def test_alpha_dpo(ls, d):
    beta, gbr, alpha = 2.5, 0.6, 0.2
    per, mean, std, z = alpha_expected(beta, gbr, alpha, ls, d)
    loss = build_loss("alpha-dpo", beta=beta, gamma_beta_ratio=gbr, alpha=alpha, label_smoothing=ls, ema_decay=d)
    out = loss(*batch())
    rc = [beta * (norm(i)[0] - alpha * (norm(i)[0] - norm(i)[2])) for i in range(3)]
    rj = [beta * (norm(i)[1] - alpha * (norm(i)[1] - norm(i)[3])) for i in range(3)]
    check(out, per, sum(per) / 3, rc, rj)
    assert out.metrics["margin_mean"] == pytest.approx(mean, rel=1e-12)
    assert out.metrics["margin_std"] == pytest.approx(std, rel=1e-12)
    assert out.metrics["margin_z_abs_mean"] == pytest.approx(sum(abs(x) for x in z) / 3, rel=1e-12)
    assert out.metrics["margin_degenerate"] == 0.0
    assert loss.state_dict() == pytest.approx({"mean": mean, "std": std, "step": 1})


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("method", method_names())
def test_reference_gets_no_gradient(method):
    pc, pj, rc, rj, lc, lj = batch(grad=True)
    out = build_loss(method, **HPARAMS[method])(pc, pj, rc, rj, lc, lj)
    out.loss.backward()
    assert rc.grad is None and rj.grad is None
    assert pc.grad is not None and torch.isfinite(pc.grad).all() and pc.grad.abs().sum() > 0


def test_alpha_dpo_margin_acts_as_a_constant():
    beta, gbr, alpha = 2.5, 0.6, 0.2
    loss = build_loss("alpha-dpo", beta=beta, gamma_beta_ratio=gbr, alpha=alpha)
    pc, pj, rc, rj, lc, lj = batch(grad=True)
    loss(pc, pj, rc, rj, lc, lj).loss.backward()
    assert rc.grad is None and rj.grad is None
    # simpo with a per-pair constant margin alpha·z + gamma_beta_ratio
    _, _, _, z = alpha_expected(beta, gbr, alpha)
    margin = alpha * torch.tensor(z, dtype=torch.float64) + gbr
    qc, qj = T(PC, grad=True), T(PJ, grad=True)
    ref = -F.logsigmoid(beta * ((qc / lc - qj / lj) - margin)).mean()
    ref.backward()
    assert torch.allclose(pc.grad, qc.grad, rtol=1e-12, atol=0)
    assert torch.allclose(pj.grad, qj.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alpha_zero_equals_simpo_exactly(dtype):
    alpha_dpo = build_loss("alpha-dpo", beta=2.0, gamma_beta_ratio=0.3, alpha=0.0, label_smoothing=0.1)
    simpo = build_loss("simpo", beta=2.0, gamma_beta_ratio=0.3, label_smoothing=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # several steps, so the statistics are non-trivial
        pc, pj, rc, rj = (-10 * torch.rand(6, generator=gen, dtype=dtype) for _ in range(4))
        lc, lj = torch.randint(1, 9, (6,), generator=gen), torch.randint(1, 9, (6,), generator=gen)
        outs, grads = [], []
        for fn in (alpha_dpo, simpo):
            a, b = pc.clone().requires_grad_(), pj.clone().requires_grad_()
            out = fn(a, b, rc, rj, lc, lj)
            out.loss.backward()
            outs.append(out)
            grads.append((a.grad, b.grad))
        assert torch.equal(outs[0].loss, outs[1].loss) and torch.equal(outs[0].losses, outs[1].losses)
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
        assert torch.equal(outs[0].chosen_rewards, outs[1].chosen_rewards)
    assert alpha_dpo.state_dict()["std"] > 0


# ---------------------------------------------------------------- AlphaDPO running statistics


def alpha_loss(**kw):
    return build_loss("alpha-dpo", **{"beta": 2.5, "gamma_beta_ratio": 0.6, "alpha": 0.2, **kw})


def test_first_step_with_zero_gaps_is_degenerate_and_finite():
    loss = alpha_loss()
    pc, pj, _, _, lc, lj = batch()
    out = loss(pc, pj, pc.clone(), pj.clone(), lc, lj)  # policy is the reference: every gap is 0
    assert loss.state_dict() == {"mean": 0.0, "std": 0.0, "step": 1}
    assert out.metrics["margin_degenerate"] == 1.0 and out.metrics["margin_z_abs_mean"] == 0.0
    simpo = build_loss("simpo", beta=2.5, gamma_beta_ratio=0.6)(pc, pj, None, None, lc, lj)
    assert torch.isfinite(out.loss) and torch.equal(out.loss, simpo.loss)  # z = 0: margin is gamma_beta_ratio
    # the next, ordinary step starts its EMA from zero
    out = loss(*batch())
    _, mean, std, _ = alpha_expected(2.5, 0.6, 0.2)
    assert loss.state_dict() == pytest.approx({"mean": mean, "std": std, "step": 2})
    assert out.metrics["margin_degenerate"] == 0.0


def test_equal_nonzero_gaps_on_first_step_are_degenerate():
    loss = alpha_loss()
    one = torch.ones(3, dtype=torch.float64)
    out = loss(-2 * one, -3 * one, -3 * one, -3 * one, one, one)  # gaps all 1, spread 0 -> z = inf officially
    assert out.metrics["margin_degenerate"] == 1.0 and torch.isfinite(out.loss)
    assert loss.state_dict() == {"mean": 0.0, "std": 0.0, "step": 1}


def test_global_batch_of_one_pair_gives_no_nan():
    loss = alpha_loss()
    loss(*batch())
    before = loss.state_dict()
    pc, pj, rc, rj, lc, lj = (x[:1] for x in batch(grad=False))
    pc.requires_grad_()
    out = loss(pc, pj, rc, rj, lc, lj)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(pc.grad).all()
    assert out.metrics["margin_degenerate"] == 1.0
    assert loss.state_dict() == {**before, "step": before["step"] + 1}


def random_batch(gen, n, dtype=torch.float64):
    pc, pj, rc, rj = (-20 * torch.rand(n, generator=gen, dtype=dtype) - 1 for _ in range(4))
    return pc, pj, rc, rj, torch.randint(1, 12, (n,), generator=gen), torch.randint(1, 12, (n,), generator=gen)


def test_ema_matches_formula_over_several_steps():
    d = 0.8
    loss = alpha_loss(ema_decay=d)
    gen = torch.Generator().manual_seed(1)
    mean = std = 0.0
    for n in (4, 7, 2, 5):
        pc, pj, rc, rj, lc, lj = random_batch(gen, n)
        gaps = ((pc / lc - pj / lj) - (rc / lc - rj / lj)).tolist()
        mean = d * mean + (1 - d) * statistics.fmean(gaps)
        std = d * std + (1 - d) * statistics.stdev(gaps)
        out = loss(pc, pj, rc, rj, lc, lj)
        assert out.metrics["margin_mean"] == pytest.approx(mean, rel=1e-12)
        assert out.metrics["margin_std"] == pytest.approx(std, rel=1e-12)
        z = [(g - mean) / std for g in gaps]
        assert out.metrics["margin_z_abs_mean"] == pytest.approx(statistics.fmean(abs(x) for x in z), rel=1e-10)
    assert loss.state_dict()["step"] == 4


def test_evaluation_reads_but_does_not_update_statistics():
    loss = alpha_loss()
    gen = torch.Generator().manual_seed(2)
    # before any training step there are no statistics: z = 0, flagged degenerate
    out = loss(*random_batch(gen, 3), train=False)
    assert out.metrics["margin_degenerate"] == 1.0 and loss.state_dict() == {"mean": 0.0, "std": 0.0, "step": 0}
    loss(*random_batch(gen, 5))
    state = loss.state_dict()
    pc, pj, rc, rj, lc, lj = random_batch(gen, 4)
    out = loss(pc, pj, rc, rj, lc, lj, train=False)
    assert loss.state_dict() == state
    gaps = (pc / lc - pj / lj) - (rc / lc - rj / lj)
    z = (gaps - state["mean"]) / state["std"]
    expected = -F.logsigmoid(2.5 * ((pc / lc - pj / lj) - (0.2 * z + 0.6)))
    assert torch.allclose(out.losses, expected, rtol=1e-12, atol=0)
    assert out.metrics["margin_degenerate"] == 0.0


def test_state_dict_round_trip_continues_identically(tmp_path):
    gen = torch.Generator().manual_seed(3)
    batches = [random_batch(gen, n) for n in (5, 3, 6, 4)]
    full = alpha_loss()
    full_outs = [full(*b) for b in batches]
    first = alpha_loss()
    for b in batches[:2]:
        first(*b)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = alpha_loss()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert resumed.state_dict() == first.state_dict()
    for b, ref in zip(batches[2:], full_outs[2:]):
        out = resumed(*b)
        assert torch.equal(out.loss, ref.loss) and out.metrics == ref.metrics
    assert resumed.state_dict() == full.state_dict()
    # 0-d tensors are accepted too
    again = alpha_loss()
    again.load_state_dict({k: torch.tensor(v, dtype=torch.float64 if k != "step" else torch.long) for k, v in first.state_dict().items()})
    assert again.state_dict() == first.state_dict()


def test_state_dict_of_stateless_methods_and_bad_state():
    for m in BUILTINS:
        loss = build_loss(m, **HPARAMS[m])
        if m != "alpha-dpo":
            assert loss.state_dict() == {}
            loss.load_state_dict({})
    with pytest.raises(ValueError, match="keys"):
        alpha_loss().load_state_dict({"mean": 0.0})
    with pytest.raises(ValueError, match="keys"):
        build_loss("dpo", beta=0.1).load_state_dict({"mean": 0.0})


# ---------------------------------------------------------------- distributed gathering (2 gloo processes)

# (rank-0 pairs, rank-1 pairs) per training step: first step all-zero gaps, then uneven splits.
SPLITS = [(2, 2), (3, 2), (1, 4), (2, 3), (3, 3)]


def dist_batches():
    gen = torch.Generator().manual_seed(4)
    out = []
    for step, (a, b) in enumerate(SPLITS):
        pc, pj, rc, rj, lc, lj = random_batch(gen, a + b)
        if step == 0:
            rc, rj = pc.clone(), pj.clone()
        out.append((pc, pj, rc, rj, lc, lj))
    return out


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        loss = alpha_loss()
        results = []
        for (a, _), full in zip(SPLITS, dist_batches()):
            part = [x[:a] if rank == 0 else x[a:] for x in full]
            out = loss(*part)
            results.append((out.losses.detach(), dict(out.metrics), loss.state_dict()))
        # evaluation is local (no collective): ranks may call it a different number of times
        for _ in range(rank + 1):
            loss(*[x[:2] for x in dist_batches()[1]], train=False)
        results.append(loss.state_dict())
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_distributed_gather_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    single = alpha_loss()
    for step, full in enumerate(dist_batches()):
        out = single(*full)
        (l0, m0, s0), (l1, m1, s1) = ranks[0][step], ranks[1][step]
        assert (len(l0), len(l1)) == SPLITS[step]
        assert s0 == s1 == single.state_dict()
        assert m0["margin_mean"] == m1["margin_mean"] == out.metrics["margin_mean"]
        assert m0["margin_std"] == m1["margin_std"] == out.metrics["margin_std"]
        assert m0["margin_degenerate"] == m1["margin_degenerate"] == out.metrics["margin_degenerate"]
        assert torch.allclose(torch.cat([l0, l1]), out.losses, rtol=1e-12, atol=0)
    assert ranks[0][0][1]["margin_degenerate"] == 1.0 and ranks[0][1][1]["margin_degenerate"] == 0.0
    assert ranks[0][-1] == ranks[1][-1] == single.state_dict()


# ---------------------------------------------------------------- degenerate batches and input checks


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("case", ["all_equal", "very_negative", "zero_logps"])
def test_no_nan_for_degenerate_batches(method, case):
    value = {"all_equal": -5.0, "very_negative": -1e4, "zero_logps": 0.0}[case]
    pc, pj = torch.full((3,), value, dtype=torch.float32, requires_grad=True), torch.full((3,), value)
    rc, rj = torch.full((3,), value), torch.full((3,), value)
    lens = torch.tensor([1, 4, 7])
    loss = build_loss(method, **HPARAMS[method])
    for _ in range(2):
        out = loss(pc, pj, rc, rj, lens, lens)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(out.losses).all()
        assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(pc.grad).all()
        assert all(math.isfinite(v) for v in out.metrics.values())


def test_orpo_with_zero_average_logp_is_finite():
    pc = torch.tensor([0.0, -3.0], requires_grad=True)
    pj = torch.tensor([-2.0, 0.0], requires_grad=True)
    out = build_loss("orpo", beta=0.1)(pc, pj, None, None, torch.tensor([2, 3]), torch.tensor([4, 1]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pj.grad).all()


def test_log1m_exp_is_accurate_across_range():
    x = torch.tensor([-1e-5, -0.01, -0.5, -0.7, -1.0, -30.0, -800.0], dtype=torch.float64)
    expected = [math.log(-math.expm1(v)) if v > -1 else math.log1p(-math.exp(v)) for v in x.tolist()]
    assert losses_mod._log1m_exp(x).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("method", method_names())
def test_zero_lengths_raise(method):
    pc, pj, rc, rj, lc, lj = batch()
    with pytest.raises(ValueError, match="response lengths must be >= 1"):
        build_loss(method, **HPARAMS[method])(pc, pj, rc, rj, lc, torch.tensor([2, 0, 3]))


def test_input_checks():
    pc, pj, rc, rj, lc, lj = batch()
    for m in ("alpha-dpo", "dpo", "ipo", "kto", "r-dpo"):
        assert build_loss(m, **HPARAMS[m]).needs_reference
        with pytest.raises(ValueError, match=f"{m}.*needs reference"):
            build_loss(m, **HPARAMS[m])(pc, pj, None, None, lc, lj)
    dpo = build_loss("dpo", beta=0.1)
    with pytest.raises(ValueError, match="rejected_lengths has 2 values"):
        dpo(pc, pj, rc, rj, lc, lj[:2])
    with pytest.raises(ValueError, match="1-D"):
        dpo(pc[None], pj, rc, rj, lc, lj)
    with pytest.raises(ValueError, match="1-D torch tensor"):
        dpo(PC, pj, rc, rj, lc, lj)
    with pytest.raises(ValueError, match="no preference pairs"):
        dpo(*(x[:0] for x in batch()))


def test_half_precision_inputs_are_computed_in_float32():
    pc, pj, rc, rj, lc, lj = batch(torch.bfloat16)
    out = build_loss("alpha-dpo", **HPARAMS["alpha-dpo"])(pc, pj, rc, rj, lc, lj)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# ---------------------------------------------------------------- registry and build_loss validation


def test_registry():
    assert method_names()[:len(BUILTINS)] == BUILTINS
    assert method_hyperparameters("alpha-dpo") == {
        "beta": REQUIRED, "gamma_beta_ratio": REQUIRED, "alpha": REQUIRED, "label_smoothing": 0.0, "ema_decay": 0.9}
    assert method_hyperparameters("cpo") == {"beta": REQUIRED, "cpo_alpha": 1.0}
    assert method_hyperparameters("r-dpo") == {"beta": REQUIRED, "length_alpha": REQUIRED}
    assert {m: build_loss(m, **HPARAMS[m]).needs_reference for m in BUILTINS} == {
        m: m not in ("simpo", "cpo", "orpo") for m in BUILTINS}
    loss = build_loss("alpha-dpo", beta=2.5, gamma_beta_ratio=0.6, alpha=0)
    assert isinstance(loss, PreferenceLoss) and loss.method == "alpha-dpo"
    assert loss.hparams == {"beta": 2.5, "gamma_beta_ratio": 0.6, "alpha": 0.0, "label_smoothing": 0.0, "ema_decay": 0.9}
    method_hyperparameters("dpo")["beta"] = 1.0  # a copy: the registry is untouched
    assert method_hyperparameters("dpo")["beta"] is REQUIRED


@pytest.mark.parametrize("name,kwargs,match", [
    ("dpoo", dict(beta=0.1), r"unknown preference-loss method 'dpoo'; valid choices: alpha-dpo, dpo, simpo"),
    ("dpo", dict(beta=0.1, alpha=0.2), r"'dpo' does not take hyperparameter\(s\) alpha; it takes: beta \(required\), "
                                       r"label_smoothing \(default 0.0\)"),
    ("alpha-dpo", dict(beta=1.0, alpha=0.1), r"'alpha-dpo' needs hyperparameter\(s\) gamma_beta_ratio"),
    ("r-dpo", dict(beta=0.1), r"needs hyperparameter\(s\) length_alpha"),
    ("dpo", dict(beta=0.0), r"beta must be > 0"),
    ("simpo", dict(beta=-1.0, gamma_beta_ratio=0.5), r"beta must be > 0"),
    ("alpha-dpo", dict(beta=1.0, gamma_beta_ratio=0.5, alpha=-0.1), r"alpha must be >= 0"),
    ("dpo", dict(beta=0.1, label_smoothing=0.6), r"label_smoothing must be in \[0, 0.5\]"),
    ("alpha-dpo", dict(beta=1.0, gamma_beta_ratio=0.5, alpha=0.1, ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
    ("cpo", dict(beta=0.1, cpo_alpha=-1.0), r"cpo_alpha must be >= 0"),
    ("dpo", dict(beta="0.1"), r"beta must be a finite number"),
    ("dpo", dict(beta=float("nan")), r"beta must be a finite number"),
    ("dpo", dict(beta=True), r"beta must be a finite number"),
])
def test_build_loss_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_loss(name, **kwargs)
    if name != "dpoo":
        assert name in str(pytest.raises(ValueError, build_loss, name, **kwargs).value)


def test_module_imports_only_stdlib_torch_and_the_distributed_seam():
    tree = ast.parse(Path(losses_mod.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level == 1 and node.module is None and [a.name for a in node.names] == ["distributed"], \
                    "losses.py imports nothing of the package but its collectives (alphadpo_ray.ml.distributed)"
                continue
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "math", "numbers", "dataclasses", "types", "typing", "difflib", "torch"}
