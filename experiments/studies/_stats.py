"""Paired differences with Student-t intervals and Holm-corrected p-values, in pure Python.

The studies compare arms that share a seed (the same initialisation of the shared weights
and the same batch order), so the unit of analysis is the per-seed difference `arm −
baseline`. `paired` gives its mean, the 95% t-interval and the two-sided p-value of the
one-sample t-test against zero; `holm` adjusts a family of p-values (Holm 1979, step-down
Bonferroni: controls the family-wise error rate under any dependence between the tests).

The Student-t distribution is computed here from the regularised incomplete beta function
(Lentz's continued fraction, as in Numerical Recipes §6.4) rather than taken from scipy,
which is only an optional dependency; `tests/test_stats.py` checks it against scipy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

__all__ = ["Paired", "holm", "paired", "t_quantile", "t_sf"]


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function `I_x(a, b)`."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """`P(T > t)` for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0; got {df}.")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(p: float, df: float) -> float:
    """The `p`-quantile of Student's t with `df` degrees of freedom (bisection on `t_sf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1); got {p}.")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1.0 - p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > 1.0 - p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Paired:
    """The mean of paired differences with its t-interval and p-value.

    **Arguments:**

    - `n`: number of pairs (seeds).
    - `mean`: mean difference.
    - `sd`: standard deviation of the differences (`ddof=1`; 0 with one pair).
    - `low`, `high`: the two-sided `level` t-interval of the mean (`mean` itself with one
      pair, or when every difference is equal).
    - `p`: two-sided p-value of the one-sample t-test of mean 0 (`1.0` with one pair, `0.0`
      or `1.0` when every difference is equal: non-zero or zero).
    - `level`: the interval's confidence level.
    """

    n: int
    mean: float
    sd: float
    low: float
    high: float
    p: float
    level: float = 0.95

    def scaled(self, factor: float) -> Paired:
        """The same statistics in other units (e.g. `100` for points of accuracy)."""
        s = abs(factor)
        low, high = sorted((self.low * factor, self.high * factor))
        return dataclasses.replace(
            self, mean=self.mean * factor, sd=self.sd * s, low=low, high=high
        )


def paired(differences: Sequence[float], level: float = 0.95) -> Paired:
    """Mean, t-interval and two-sided p-value of paired differences (one per seed).

    **Raises:**

    `ValueError` for no differences, a non-finite one, or a level outside (0, 1).
    """
    d = [float(x) for x in differences]
    if not d:
        raise ValueError("paired needs at least one difference.")
    if not all(math.isfinite(x) for x in d):
        raise ValueError(f"differences must be finite; got {d}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); got {level}.")
    n = len(d)
    mean = math.fsum(d) / n
    if n == 1:
        return Paired(1, mean, 0.0, mean, mean, 1.0, level)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    if se <= 1e-15 * max(1.0, abs(mean)):
        return Paired(n, mean, sd, mean, mean, 0.0 if mean != 0 else 1.0, level)
    q = t_quantile(0.5 + level / 2.0, n - 1)
    p = min(1.0, 2.0 * t_sf(abs(mean) / se, n - 1))
    return Paired(n, mean, sd, mean - q * se, mean + q * se, p, level)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values of a family of tests (same keys).

    The `k`-th smallest of `m` p-values is multiplied by `m - k + 1`, the results are made
    non-decreasing in that order and capped at 1; a test is rejected at level `a` when its
    adjusted p-value is at most `a`.
    """
    order = sorted(p_values, key=p_values.get)
    m = len(order)
    adjusted: dict[str, float] = {}
    running = 0.0
    for k, name in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[name]))
        adjusted[name] = running
    return {name: adjusted[name] for name in p_values}
