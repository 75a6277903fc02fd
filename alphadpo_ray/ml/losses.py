"""The eight preference losses behind one registry: AlphaDPO and its baselines.

Conventions (all methods):

* Inputs are 1-D tensors of one batch of B preference pairs: the policy's and the reference's
  **summed** log-probabilities of the response tokens (``π``, ``r``) of the chosen (``c``) and
  rejected (``j``) responses, and the response token counts ``|y|`` (int or float tensors, each
  >= 1). ``π̄ = π/|y|`` is the length-normalised (average per-token) log-prob. Half-precision
  inputs are computed in float32.
* Reference-free methods (simpo, cpo, orpo) accept ``None`` for the reference tensors; the others
  raise ``ValueError`` when given ``None``. The reference is fixed: reference inputs are detached.
* ``LossOutput.loss`` is the mean of the per-pair losses (kto: of the 2B halves), plus the NLL term
  for cpo/orpo: ``NLL = -Σπc / Σ|yc|``, the token-mean negative log-likelihood of the chosen responses.
  ``losses`` holds the per-pair losses before that mean (without the NLL term).
* Rewards are detached, shape [B]; ``metrics`` holds extra diagnostics as Python floats.

The registry (``register_method``, ``method_spec``, ``method_names``) holds everything about a method
in one ``MethodSpec``: its loss function, its hyperparameters (default, valid range, starting value,
default search space), whether it needs a reference, its implicit reward, and the papers' settings.
Config validation, sweeps, ``compare`` and reports read methods from here only, so adding a method is
its function + one ``register_method`` call + its tests. ``build_loss(name, **hparams)`` validates
the hyperparameters and returns a ``PreferenceLoss``.
Only alpha-dpo has state (running statistics of its margin), see ``alpha_dpo_loss``; training
calls of alpha-dpo are collective over the data-parallel group (every worker must call it).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from . import distributed


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()
"""Sentinel for a hyperparameter without a default (see ``method_hyperparameters``)."""

_ORPO_EPS = 1e-6  # π̄ is clamped to <= -eps so log(1 - e^π̄) stays finite at π̄ = 0


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar training loss
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor  # [B], detached
    losses: torch.Tensor  # per-pair losses before the mean ([2B] for kto), without the NLL term
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class MarginStats:
    """AlphaDPO's running mean/std of the gap (Python floats: device-agnostic) and its step counter."""

    mean: float = 0.0
    std: float = 0.0
    step: int = 0  # training calls seen


def _sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """-(1-ls)·log σ(beta·u) - ls·log σ(-beta·u) (conservative DPO label smoothing)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def _nll(pc: torch.Tensor, lc: torch.Tensor) -> torch.Tensor:
    return -pc.sum() / lc.sum()


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x <= 0, stably (Mächler 2012); x is clamped to <= -1e-6."""
    x = x.clamp(max=-_ORPO_EPS)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dpo_loss(pc, pj, rc, rj, lc, lj, *, beta, label_smoothing=0.0) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290).

    d = (πc - rc) - (πj - rj); loss = -(1-ls)·log σ(beta·d) - ls·log σ(-beta·d); rewards beta·(π - r).
    """
    losses = _sigmoid_loss((pc - rc) - (pj - rj), beta, label_smoothing)
    return LossOutput(losses.mean(), beta * (pc - rc).detach(), beta * (pj - rj).detach(), losses)


def simpo_loss(pc, pj, rc, rj, lc, lj, *, beta, gamma_beta_ratio, label_smoothing=0.0) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734); reference-free.

    u = (π̄c - π̄j) - gamma_beta_ratio; loss = -(1-ls)·log σ(beta·u) - ls·log σ(-beta·u); rewards beta·π̄.
    """
    nc, nj = pc / lc, pj / lj
    losses = _sigmoid_loss((nc - nj) - gamma_beta_ratio, beta, label_smoothing)
    return LossOutput(losses.mean(), beta * nc.detach(), beta * nj.detach(), losses)


def ipo_loss(pc, pj, rc, rj, lc, lj, *, beta) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036), on length-normalised log-probs; beta is τ.

    loss = ((π̄c - π̄j) - (r̄c - r̄j) - 1/(2·beta))²; rewards beta·(π̄ - r̄).
    """
    nc, nj, rnc, rnj = pc / lc, pj / lj, rc / lc, rj / lj
    losses = ((nc - nj) - (rnc - rnj) - 1 / (2 * beta)) ** 2
    return LossOutput(losses.mean(), beta * (nc - rnc).detach(), beta * (nj - rnj).detach(), losses)


def cpo_loss(pc, pj, rc, rj, lc, lj, *, beta, cpo_alpha=1.0) -> LossOutput:
    """CPO (Xu et al. 2024, arXiv 2401.08417); reference-free.

    loss = mean(-log σ(beta·(πc - πj))) + cpo_alpha·NLL; rewards beta·π. metrics: nll.
    """
    losses = -F.logsigmoid(beta * (pc - pj))
    nll = _nll(pc, lc)
    return LossOutput(
        losses.mean() + cpo_alpha * nll, beta * pc.detach(), beta * pj.detach(), losses, {"nll": nll.item()}
    )


def kto_loss(pc, pj, rc, rj, lc, lj, *, beta) -> LossOutput:
    """Paired KTO (Ethayarajh et al. 2024, arXiv 2402.01306), as in the HALOs/TRL implementation.

    KLc = mean(πc - rc) clamped >= 0, KLj likewise, both detached (each half's KL reference point is
    estimated from the other half); losses = [1 - σ(beta·((πc - rc) - KLj)), 1 - σ(beta·(KLc - (πj - rj)))]
    concatenated ([2B]), loss = their mean; rewards beta·(π - r).
    """
    lrc, lrj = pc - rc, pj - rj
    kl_c = lrc.detach().mean().clamp(min=0)
    kl_j = lrj.detach().mean().clamp(min=0)
    losses = torch.cat((1 - torch.sigmoid(beta * (lrc - kl_j)), 1 - torch.sigmoid(beta * (kl_c - lrj))))
    return LossOutput(losses.mean(), beta * lrc.detach(), beta * lrj.detach(), losses)


def orpo_loss(pc, pj, rc, rj, lc, lj, *, beta) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691); reference-free, beta is λ.

    log-odds = (π̄c - π̄j) - (log(1 - e^π̄c) - log(1 - e^π̄j)); loss = NLL - beta·mean(log σ(log-odds));
    rewards beta·π̄. log(1 - e^x) is computed stably with x clamped to <= -1e-6. metrics: nll.
    """
    nc, nj = pc / lc, pj / lj
    log_odds = (nc - nj) - (_log1m_exp(nc) - _log1m_exp(nj))
    losses = -beta * F.logsigmoid(log_odds)
    nll = _nll(pc, lc)
    return LossOutput(losses.mean() + nll, beta * nc.detach(), beta * nj.detach(), losses, {"nll": nll.item()})


def r_dpo_loss(pc, pj, rc, rj, lc, lj, *, beta, length_alpha) -> LossOutput:
    """R-DPO, length-regularised DPO (Park et al. 2024, arXiv 2403.19159).

    loss = -log σ(beta·d + length_alpha·(|yc| - |yj|)), d as in dpo; rewards beta·(π - r).
    """
    losses = -F.logsigmoid(beta * ((pc - rc) - (pj - rj)) + length_alpha * (lc - lj))
    return LossOutput(losses.mean(), beta * (pc - rc).detach(), beta * (pj - rj).detach(), losses)


def _margin_z(gap: torch.Tensor, stats: MarginStats, ema_decay: float, train: bool) -> tuple[torch.Tensor, bool]:
    """Standardised gap z (float64, detached) and whether the step was degenerate; updates stats if train."""
    with torch.no_grad():
        gap = gap.detach().to(torch.float64)
        if not train:
            mean, std = stats.mean, stats.std
            z = (gap - mean) / std if std > 0 else torch.full_like(gap, math.nan)
            ok = bool(torch.isfinite(z).all())
        else:
            stats.step += 1
            everyone = distributed.all_gather_1d(gap)
            ok = everyone.numel() >= 2  # std of one value is NaN in the official code
            if ok:
                d = ema_decay
                mean = d * stats.mean + (1 - d) * everyone.mean().item()
                std = d * stats.std + (1 - d) * everyone.std().item()
                # Decide on the global batch so that every worker takes the same branch.
                ok = math.isfinite(mean) and math.isfinite(std) and std > 0
                ok = ok and bool(torch.isfinite((everyone - mean) / std).all())
            if ok:
                stats.mean, stats.std = mean, std
                z = (gap - mean) / std
        return (z if ok else torch.zeros_like(gap)), not ok


def alpha_dpo_loss(
    pc, pj, rc, rj, lc, lj, *, beta, gamma_beta_ratio, alpha, label_smoothing=0.0, ema_decay=0.9,
    stats: MarginStats | None = None, train: bool = True,
) -> LossOutput:
    """AlphaDPO (Wu et al. 2024, arXiv 2410.10148), as in the official AlphaDPOTrainer.

    gap = (π̄c - π̄j) - (r̄c - r̄j) per pair. On training calls the gap of the whole global batch is
    all-gathered from every data-parallel worker (sizes may differ) and the running statistics are
    updated before use: mean ← d·mean + (1-d)·mean(gap), std ← d·std + (1-d)·std(gap) (unbiased std,
    d = ema_decay, both starting at 0). z = (gap - mean)/std for the local pairs;
    u = (π̄c - π̄j) - sg[alpha·z + gamma_beta_ratio]; loss = -(1-ls)·log σ(beta·u) - ls·log σ(-beta·u);
    rewards beta·(π̄ - alpha·(π̄ - r̄)). The margin is detached (no gradient through it or the gather).
    With alpha = 0 this is simpo.

    Intended deviations from the official code:
    (1) where it would produce NaN/inf (in the new mean/std or in z) the statistics stay unchanged
        and z = 0 for that step ("degenerate"): the first step of a real run, where the policy is the
        reference so every gap is 0 and the spread is 0, and a global batch of one pair;
    (2) it also updates the statistics on evaluation batches, so its training depends on how often
        it evaluates; here only ``train=True`` calls update them, evaluation reads them.
    Training calls are collective (every worker must make them); evaluation calls are local.
    ``stats`` is mutated in place (a fresh ``MarginStats`` if None; its ``step`` counts training
    calls, degenerate ones included). metrics: margin_mean,
    margin_std (after the update), margin_z_abs_mean, margin_degenerate (1.0 or 0.0).
    """
    stats = MarginStats() if stats is None else stats
    nc, nj, rnc, rnj = pc / lc, pj / lj, rc / lc, rj / lj
    z, degenerate = _margin_z((nc - nj) - (rnc - rnj), stats, ema_decay, train)
    margin = (alpha * z + gamma_beta_ratio).to(nc.dtype)
    losses = _sigmoid_loss((nc - nj) - margin, beta, label_smoothing)
    metrics = {
        "margin_mean": stats.mean,
        "margin_std": stats.std,
        "margin_z_abs_mean": z.abs().mean().item(),
        "margin_degenerate": float(degenerate),
    }
    rewards_c = beta * (nc - alpha * (nc - rnc)).detach()
    rewards_j = beta * (nj - alpha * (nj - rnj)).detach()
    return LossOutput(losses.mean(), rewards_c, rewards_j, losses, metrics)


# --------------------------------------------------------------------------------------------------
# The registry: everything about a method in one entry


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of a method: its default (or ``REQUIRED``), its valid range, the value a config
    starts from when a required one is left out (``start``), and its default sweep search space (Ray Tune
    space spec, ``{type: loguniform|uniform|quniform|choice|grid, ...}``; None: not searched by default)."""

    default: object = REQUIRED
    low: float | None = None  # valid range; None: unbounded on that side
    high: float | None = None
    low_open: bool = False  # True: low itself is not valid (> low rather than >= low)
    high_open: bool = False
    start: float | None = None
    space: Mapping | None = None
    doc: str = ""

    @property
    def expected(self) -> str:
        """The valid range in words ("> 0", "in [0, 0.5]", ...); "" when any finite number will do."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def problem(self, value) -> str | None:
        """Why `value` is not valid for this hyperparameter, or None."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        too_low = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        return f"must be {self.expected}, got {value}" if too_low or too_high else None


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its loss function and everything the config, sweeps and reports need."""

    name: str
    fn: Callable[..., LossOutput]
    hyperparameters: Mapping[str, Hyperparameter]
    needs_reference: bool = True  # False: reference-free (no reference log-probs are computed for it)
    stateful: bool = False  # True: fn takes `stats` (MarginStats) and `train`, and its state is checkpointed
    implicit_reward: str = ""  # the reward `accuracy` ranks pairs by, as a formula (π summed, π̄ length-normalised)
    paper_points: tuple[Mapping[str, float], ...] = ()  # published settings, evaluated first by sweeps
    source: str = ""  # the paper

    def defaults(self) -> dict[str, object]:
        """name -> default, or ``REQUIRED`` where there is none."""
        return {k: h.default for k, h in self.hyperparameters.items()}

    def starting_hyperparameters(self) -> dict[str, float]:
        """The values a config uses for required hyperparameters it leaves out."""
        return {k: h.start for k, h in self.hyperparameters.items() if h.start is not None}

    def default_space(self) -> dict[str, dict]:
        return {k: dict(h.space) for k, h in self.hyperparameters.items() if h.space is not None}

    def describe(self) -> str:
        return ", ".join(f"{k} ({'required' if h.default is REQUIRED else f'default {h.default}'})"
                         for k, h in self.hyperparameters.items())


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, fn: Callable[..., LossOutput], *, hyperparameters: Mapping[str, Hyperparameter],
                    needs_reference: bool = True, stateful: bool = False, implicit_reward: str = "",
                    paper_points: tuple = (), source: str = "") -> MethodSpec:
    """Add a method to the registry (config validation, sweeps, `compare` and reports all read it from here).

    `fn(pc, pj, rc, rj, lc, lj, **hyperparameters)` returns a `LossOutput` (see the module docstring).
    Every hyperparameter with a default search space must be searchable; paper points name only
    hyperparameters the method takes.
    """
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    if not isinstance(name, str) or not name or name.strip() != name:
        raise ValueError(f"method name must be a non-empty string without surrounding spaces, got {name!r}")
    for point in paper_points:
        unknown = set(point) - set(hyperparameters) - {"learning_rate"}
        if unknown:
            raise ValueError(f"method {name!r}: paper point {dict(point)} names {', '.join(sorted(unknown))}, "
                             "which the method does not take")
    spec = MethodSpec(name, fn, MappingProxyType(dict(hyperparameters)), needs_reference, stateful,
                      implicit_reward, tuple(MappingProxyType(dict(p)) for p in paper_points), source)
    _REGISTRY[name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method added with `register_method` (tests, plugins)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Registered methods, in registration order (the eight built-ins first)."""
    return tuple(_REGISTRY)


def method_spec(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown preference-loss method {name!r}; valid choices: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def method_hyperparameters(name: str) -> dict[str, object]:
    """The hyperparameters ``name`` takes: name -> default, or ``REQUIRED`` where there is none."""
    return method_spec(name).defaults()


def needs_reference(name: str) -> bool:
    """Whether method ``name`` uses reference log-probs (False for simpo, cpo, orpo)."""
    return method_spec(name).needs_reference


def hyperparameter_problems(name: str, hparams: Mapping) -> list[tuple[str, str]]:
    """(hyperparameter, what is wrong) for every problem of `hparams` for method `name` (unknown,
    missing required, non-finite, out of range); empty when they are valid."""
    spec = method_spec(name)
    import difflib

    def close(k) -> str:
        match = difflib.get_close_matches(str(k), list(spec.hyperparameters), n=1, cutoff=0.7)
        return f" (did you mean {match[0]}?)" if match else ""

    problems = [(k, f"method {name!r} does not take this hyperparameter{close(k)}; it takes: {spec.describe()}")
                for k in hparams if k not in spec.hyperparameters]
    for k, h in spec.hyperparameters.items():
        if k not in hparams:
            if h.default is REQUIRED:
                problems.append((k, f"required by method {name!r}; it takes: {spec.describe()}"))
            continue
        problem = h.problem(hparams[k])
        if problem:
            problems.append((k, f"{problem} (method {name!r})"))
    return problems


# Hyperparameters shared by several methods (each method's entry may give its own start and space).
def _beta(start: float, values: list[float], doc: str = "inverse temperature β") -> Hyperparameter:
    return Hyperparameter(low=0, low_open=True, start=start, space={"type": "choice", "values": values}, doc=doc)


def _gamma(start: float, low: float, high: float) -> Hyperparameter:
    """γ/β, the target reward margin: γ ≥ 0 (SimPO, arXiv 2405.14734, §2.2; a negative margin rewards
    ranking the rejected response higher)."""
    return Hyperparameter(low=0, start=start, space={"type": "uniform", "low": low, "high": high},
                          doc="target reward margin γ/β")


_LABEL_SMOOTHING = Hyperparameter(0.0, low=0, high=0.5, doc="conservative-DPO label smoothing")

# The papers' search ranges (SimPO, arXiv 2405.14734, Table 7; AlphaDPO, arXiv 2410.10148, §5) and
# settings; `start` values suit the built-in task (the paper setups under experiments/paper/ set the
# official values).
register_method(
    "alpha-dpo", alpha_dpo_loss, stateful=True, source="arXiv 2410.10148",
    implicit_reward="β·(π̄ − α·(π̄ − r̄))",
    # (α first: a search space is sampled by Optuna in this order, the order sweeps have always used,
    # so a seeded sweep proposes the same trials)
    hyperparameters={
        "alpha": Hyperparameter(low=0, start=0.2, space={"type": "loguniform", "low": 0.01, "high": 0.5},
                                doc="weight α of the adaptive margin"),
        "beta": _beta(2.5, [2.5, 10.0]),
        "gamma_beta_ratio": _gamma(0.3, 0.1, 0.6),
        "label_smoothing": _LABEL_SMOOTHING,
        "ema_decay": Hyperparameter(0.9, low=0, high=1, high_open=True, doc="decay of the margin's running statistics"),
    },
    paper_points=({"beta": 2.5, "gamma_beta_ratio": 0.6, "alpha": 0.2},  # Llama-3-8B-Instruct
                  {"beta": 2.5, "gamma_beta_ratio": 0.15, "alpha": 0.05}),  # Mistral-7B-Instruct
)
register_method(
    "dpo", dpo_loss, source="arXiv 2305.18290", implicit_reward="β·(π − r)",
    hyperparameters={"beta": _beta(0.1, [0.01, 0.05, 0.1]), "label_smoothing": _LABEL_SMOOTHING},
    paper_points=({"beta": 0.1}, {"beta": 0.01}),
)
register_method(
    "simpo", simpo_loss, needs_reference=False, source="arXiv 2405.14734", implicit_reward="β·π̄",
    hyperparameters={
        "beta": _beta(2.5, [2.0, 2.5, 10.0]),
        "gamma_beta_ratio": _gamma(0.3, 0.1, 0.65),
        "label_smoothing": _LABEL_SMOOTHING,
    },
    paper_points=({"beta": 2.5, "gamma_beta_ratio": 0.55}, {"beta": 2.5, "gamma_beta_ratio": 0.1}),
)
register_method(
    "ipo", ipo_loss, source="arXiv 2310.12036", implicit_reward="β·(π̄ − r̄)",
    hyperparameters={"beta": _beta(0.1, [0.01, 0.1, 0.5, 1.0], doc="τ (the target margin is 1/(2τ))")},
    paper_points=({"beta": 0.5},),
)
register_method(
    "cpo", cpo_loss, needs_reference=False, source="arXiv 2401.08417", implicit_reward="β·π",
    hyperparameters={"beta": _beta(0.1, [0.01, 0.05, 0.1]),
                     "cpo_alpha": Hyperparameter(1.0, low=0, doc="weight of the NLL term")},
    paper_points=({"beta": 0.1},),
)
register_method(
    "kto", kto_loss, source="arXiv 2402.01306", implicit_reward="β·(π − r)",
    hyperparameters={"beta": _beta(0.1, [0.01, 0.05, 0.1])},
    paper_points=({"beta": 0.1},),
)
register_method(
    "orpo", orpo_loss, needs_reference=False, source="arXiv 2403.07691", implicit_reward="β·π̄",
    hyperparameters={"beta": _beta(0.1, [0.1, 0.5, 1.0, 2.0], doc="λ, weight of the odds-ratio term")},
    paper_points=({"beta": 0.1},),
)
register_method(
    "r-dpo", r_dpo_loss, source="arXiv 2403.19159", implicit_reward="β·(π − r)",
    hyperparameters={
        "beta": _beta(0.1, [0.01, 0.05, 0.1]),
        "length_alpha": Hyperparameter(low=0, start=0.05, space={"type": "choice", "values": [0.05, 0.1, 0.5, 1.0]},
                                       doc="weight α of the length term"),
    },
    paper_points=({"beta": 0.1, "length_alpha": 0.05},),
)


def _as_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a 1-D torch tensor, got {type(x).__name__}")
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor (one value per pair), got shape {tuple(x.shape)}")
    return x


class PreferenceLoss:
    """A validated method + hyperparameters; call it on a batch (see the module docstring)."""

    def __init__(self, method: str, hparams: dict[str, float]):
        spec = method_spec(method)
        self.method, self.hparams, self.needs_reference = method, dict(hparams), spec.needs_reference
        self._fn = spec.fn
        self._stats = MarginStats() if spec.stateful else None

    def __repr__(self) -> str:
        return f"PreferenceLoss({self.method!r}, {self.hparams})"

    def __call__(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_lengths, rejected_lengths, *, train: bool = True) -> LossOutput:
        pc = _as_tensor(policy_chosen_logps, "policy_chosen_logps")
        pj = _as_tensor(policy_rejected_logps, "policy_rejected_logps")
        dtype = pc.dtype if pc.dtype in (torch.float32, torch.float64) else torch.float32
        batch = pc.shape[0]
        if batch == 0:
            raise ValueError(f"{self.method}: the batch holds no preference pairs")
        named = {"policy_rejected_logps": pj, "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
        if ref_chosen_logps is None or ref_rejected_logps is None:
            if self.needs_reference:
                raise ValueError(f"method {self.method!r} needs reference log-probs: "
                                 "ref_chosen_logps and ref_rejected_logps must not be None")
            rc = rj = None
        else:
            named.update(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
        for k, v in named.items():
            if _as_tensor(v, k).shape[0] != batch:
                raise ValueError(f"{k} has {v.shape[0]} values but policy_chosen_logps has {batch}")
        lc = chosen_lengths.to(device=pc.device, dtype=dtype)
        lj = rejected_lengths.to(device=pc.device, dtype=dtype)
        if bool((lc < 1).any()) or bool((lj < 1).any()):
            raise ValueError("response lengths must be >= 1 (a response with no tokens cannot be scored)")
        if "ref_chosen_logps" in named:  # the reference is fixed: no gradient flows into it
            rc = ref_chosen_logps.detach().to(device=pc.device, dtype=dtype)
            rj = ref_rejected_logps.detach().to(device=pc.device, dtype=dtype)
        extra = {"stats": self._stats, "train": train} if self._stats is not None else {}
        return self._fn(pc.to(dtype), pj.to(dtype), rc, rj, lc, lj, **self.hparams, **extra)

    def state_dict(self) -> dict:
        """alpha-dpo: {"mean", "std", "step"} as Python numbers; other methods: {}."""
        if self._stats is None:
            return {}
        return {"mean": self._stats.mean, "std": self._stats.std, "step": self._stats.step}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what ``state_dict`` returned (Python numbers or 0-d tensors)."""
        want = set(self.state_dict())
        if set(state) != want:
            raise ValueError(f"{self.method}: state_dict keys {sorted(state)} do not match {sorted(want)}")
        if self._stats is not None:
            value = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            self._stats = MarginStats(float(value["mean"]), float(value["std"]), int(value["step"]))


def build_loss(name: str, **hparams) -> PreferenceLoss:
    """Validate ``hparams`` for method ``name`` (defaults filled in) and return its ``PreferenceLoss``."""
    spec = method_spec(name)
    unknown = sorted(set(hparams) - set(spec.hyperparameters))
    if unknown:
        raise ValueError(f"method {name!r} does not take hyperparameter(s) {', '.join(unknown)}; "
                         f"it takes: {spec.describe()}")
    missing = [k for k, h in spec.hyperparameters.items() if h.default is REQUIRED and k not in hparams]
    if missing:
        raise ValueError(f"method {name!r} needs hyperparameter(s) {', '.join(missing)}; "
                         f"it takes: {spec.describe()}")
    resolved = {k: hparams.get(k, h.default) for k, h in spec.hyperparameters.items()}
    for k, h in spec.hyperparameters.items():
        problem = h.problem(resolved[k])
        if problem:
            raise ValueError(f"method {name!r}: hyperparameter {k} {problem}")
    return PreferenceLoss(name, {k: float(v) for k, v in resolved.items()})
