"""Statistics over seeds: 95 % t-intervals, differences between methods, ranks with ties, verdicts.

A method's figure in a comparison is the mean over n independent training seeds of its best
configuration, with the two-sided Student-t interval mean ± t(0.975, n−1)·s/√n (s: the sample standard
deviation over seeds). Two methods differ only when the Welch t-interval of the difference of their
means excludes 0; otherwise they are shown as tied. With one seed no interval exists (``low``/``high``
are None) and nothing is resolved.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """Mean of `n` values and its two-sided t-interval at `level` (None bounds when n < 2)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    level: float = LEVEL

    @property
    def resolved(self) -> bool:
        return self.low is not None and self.high is not None

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self, digits: int = 3) -> str:
        """``0.912 ± 0.031`` (or ``0.912`` with one value, ``-`` with none)."""
        if self.mean is None:
            return "-"
        if not self.resolved:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {(self.high - self.low) / 2:.{digits}f}"


def _finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _t_quantile(level: float, dof: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def t_interval(values, level: float = LEVEL) -> Interval:
    """Mean ± t(½ + level/2, n−1)·s/√n over the finite `values`."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return Interval(None, None, None, 0, level)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, None, None, n, level)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = _t_quantile(level, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def difference_interval(a, b, level: float = LEVEL) -> Interval:
    """Welch t-interval of mean(a) − mean(b) (unequal variances, Welch–Satterthwaite degrees of freedom)."""
    xa, xb = _finite(a), _finite(b)
    if not xa or not xb:
        return Interval(None, None, None, min(len(xa), len(xb)), level)
    diff = sum(xa) / len(xa) - sum(xb) / len(xb)
    if len(xa) < 2 or len(xb) < 2:
        return Interval(diff, None, None, min(len(xa), len(xb)), level)

    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    va, vb = var(xa) / len(xa), var(xb) / len(xb)
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(diff, diff, diff, min(len(xa), len(xb)), level)
    dof = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    half = _t_quantile(level, dof) * se
    return Interval(diff, diff - half, diff + half, min(len(xa), len(xb)), level)


def better(a, b, higher_is_better: bool = True, level: float = LEVEL) -> bool:
    """True when `a`'s values are resolved better than `b`'s: the difference interval excludes 0."""
    d = difference_interval(a, b, level)
    if not d.resolved:
        return False
    return d.low > 0 if higher_is_better else d.high < 0


def rank_with_ties(samples: dict[str, list[float]], higher_is_better: bool = True,
                   tiebreak: dict[str, list[float]] | None = None) -> list[tuple[str, int]]:
    """(name, rank) in display order. A name's rank is 1 + the number of names resolved better than it
    (`better`), so names within each other's noise share a rank ("tied"). Display order: rank, then the
    mean (best first), then the mean of `tiebreak` (lower first, e.g. KL), then the name."""
    def mean(xs):
        xs = _finite(xs)
        return sum(xs) / len(xs) if xs else None

    ranks = {name: 1 + sum(better(samples[o], samples[name], higher_is_better) for o in samples if o != name)
             for name in samples}
    sign = -1 if higher_is_better else 1

    def key(name):
        m = mean(samples[name])
        t = mean((tiebreak or {}).get(name, []))
        return (ranks[name], math.inf if m is None else sign * m, math.inf if t is None else t, name)

    return [(name, ranks[name]) for name in sorted(samples, key=key)]


def lower_kl_verdict(kl_a, kl_b, acc_a, acc_b, level: float = LEVEL) -> dict:
    """"Does method a reach lower KL than method b at matched accuracy?" from per-seed values.

    Accuracy counts as matched when a's accuracy is not resolved below b's (the Welch interval of
    acc_a − acc_b does not lie below 0). Then ``yes`` if the interval of kl_a − kl_b lies below 0, ``no``
    if it lies above 0, ``not resolved`` if it contains 0. If a's accuracy is resolved lower, the KL
    comparison is not at matched accuracy: ``not resolved`` with that reason."""
    kl = difference_interval(kl_a, kl_b, level)
    acc = difference_interval(acc_a, acc_b, level)
    if not kl.resolved or not acc.resolved:
        answer, why = "not resolved", "fewer than 2 seeds per method"
    elif acc.high < 0:
        answer, why = "not resolved", "accuracy is not matched: the first method's accuracy is resolved lower"
    elif kl.high < 0:
        answer, why = "yes", "the KL difference interval lies below 0"
    elif kl.low > 0:
        answer, why = "no", "the KL difference interval lies above 0"
    else:
        answer, why = "not resolved", "the KL difference interval contains 0"
    return {"answer": answer, "reason": why, "kl_difference": kl.as_dict(), "accuracy_difference": acc.as_dict()}


__all__ = ["Interval", "LEVEL", "t_interval", "difference_interval", "better", "rank_with_ties", "lower_kl_verdict"]
