"""treetune's RPC (Reasoning Pruning + Perplexity Consistency, arXiv 2510.15444): answer by the
probability mass of each answer class over the distinct, unpruned sampled paths. A variant of the
method, not its authors' arithmetic: `rpc_reference.py` (selector `rpc_reference`) follows their
code; this module departs from it in three places, each deliberate.

- Pruning fits the same two-component Weibull mixture to the length-normalised p = exp(mean token
  log-prob) (L-BFGS-B, the authors' bounds w in [0.2, 0.8], k, lambda >= 0.01), from two starts:
  the authors' [0.5, 1, 1, 1.5, 2] and one from the data (one component on each half of the sorted
  sample), keeping the likelier of the two local optima; gradients are analytic, in log space. No
  fit is "the" maximum-likelihood estimate: a two-component mixture's likelihood is unbounded (a
  component shrinking onto one point has unbounded density), and on arith most fits of either
  start are degenerate (at N = 16: 81% of these fits have a component of shape k >= 50; 80% of
  the single start's end with a component at k >= 50 or on the 0.01 scale bound). The data start
  lays the low component on the data, so this pruning removes far more than the authors' (on
  arith 28.8% of the paths at N = 16, against 6.7% from the single start). The rule is theirs: a
  path is pruned when the low-mean component explains it better and its p lies strictly below the
  mean, so no path at or above average is ever pruned. Fits are cached by the sorted p's (several
  selectors prune the same subset). L-BFGS-B's 5x5 BLAS calls run 10-40x slower when OpenBLAS
  threads contend for a busy CPU: set OPENBLAS_NUM_THREADS=1.
- Votes (`rpc`, `pc`) sum the *joint* probabilities p(t|x) of the distinct unpruned completions
  of a class: the paper's formula, and the reading under which counting each distinct text once
  estimates an answer's probability mass. Joint probabilities underflow, so they enter as
  exp(log p - max log p) over the problem's kept paths; a common factor ranks classes the same.
  The authors' code sums the length-normalised p over distinct texts instead: no probability
  mass, but a count of distinct texts scaled by ~0.5-0.9.
- Ties go to the class seen first, as for every treetune selector; the authors share the credit.

On 200 arith problems x 16 samples of the tiny policy (benchmarks/rpc_arith.py; 41% of the samples
repeat an earlier one word for word) `rpc` scores 0.450 at N = 16 and matches majority@16 (0.420)
from N = 4; the authors' arithmetic (`rpc_reference`) peaks at 0.395 (N = 2) and ends at 0.365,
below majority. The votes decide most of the gap: the authors' votes after this pruning score
0.390, this module's votes without pruning (`pc`) 0.455. The two RPCs answer alike in 86% of
subsets at N = 4, 69% at N = 8, 63% at N = 16. One accuracy's standard error there is ~0.035.
`rpc_mean` prunes the same way and lets every kept sample vote with its length-normalised p: for
long chains of thought, where no completion repeats and joint probabilities of long paths differ by
orders of magnitude (one path's mass would decide).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import minimize
from scipy.special import gamma

PAPER_START = (0.5, 1.0, 1.0, 1.5, 2.0)  # w, k1, lambda1, k2, lambda2 (WNJXYK/RPC)
BOUNDS = [(0.2, 0.8), (0.01, None), (0.01, None), (0.01, None), (0.01, None)]
_MAX_EXPONENT = 300.0  # (x / lambda)^k is computed as exp(min(k log(x / lambda), this)): no overflow


@dataclass(frozen=True)
class WeibullMixture:
    """w Weibull(k1, lam1) + (1 - w) Weibull(k2, lam2); after fitting, component 1 has the larger mean."""

    w: float
    k1: float
    lam1: float
    k2: float
    lam2: float

    @staticmethod
    def mean(k: float, lam: float) -> float:
        return lam * gamma(1.0 + 1.0 / k)

    def high_first(self) -> "WeibullMixture":
        """The same mixture with the higher-mean component first."""
        if self.mean(self.k1, self.lam1) >= self.mean(self.k2, self.lam2):
            return self
        return WeibullMixture(1.0 - self.w, self.k2, self.lam2, self.k1, self.lam1)

    def component_logpdfs(self, x: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log(w f1(x)) and log((1 - w) f2(x))."""
        x = _positive(x)
        l1, _, _ = _weibull_logpdf(x, self.k1, self.lam1)
        l2, _, _ = _weibull_logpdf(x, self.k2, self.lam2)
        return math.log(self.w) + l1, math.log(1.0 - self.w) + l2

    def log_likelihood(self, x: Sequence[float] | np.ndarray) -> float:
        a, b = self.component_logpdfs(x)
        return float(np.logaddexp(a, b).sum())

    def posterior_high(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        """P(component 1 | x) for each x (component 1 is the high one after `high_first`)."""
        a, b = self.component_logpdfs(x)
        return np.exp(a - np.logaddexp(a, b))


def _positive(x: Sequence[float] | np.ndarray) -> np.ndarray:
    # A path of probability 0 (log-prob -inf) would make every Weibull log-density -inf.
    return np.maximum(np.asarray(x, dtype=float), 1e-300)


def _weibull_logpdf(x: np.ndarray, k: float, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log f(x; k, lam) and its derivatives in k and lam."""
    u = np.log(x) - math.log(lam)
    z = np.exp(np.minimum(k * u, _MAX_EXPONENT))
    logpdf = math.log(k) - math.log(lam) + (k - 1.0) * u - z
    return logpdf, 1.0 / k + (1.0 - z) * u, (k / lam) * (z - 1.0)


def _nll_and_grad(params: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray]:
    w, k1, lam1, k2, lam2 = params
    l1, dk1, dlam1 = _weibull_logpdf(x, k1, lam1)
    l2, dk2, dlam2 = _weibull_logpdf(x, k2, lam2)
    a, b = math.log(w) + l1, math.log(1.0 - w) + l2
    mix = np.logaddexp(a, b)
    r1 = np.exp(a - mix)  # responsibility of component 1
    r2 = 1.0 - r1
    grad = np.array([
        np.sum(r1 / w - r2 / (1.0 - w)),
        np.sum(r1 * dk1), np.sum(r1 * dlam1), np.sum(r2 * dk2), np.sum(r2 * dlam2),
    ])
    return -float(mix.sum()), -grad


def _data_start(x: np.ndarray) -> tuple[float, ...]:
    """A start near the data: one component on each half of the sorted sample."""
    xs = np.sort(x)
    halves = [xs[: max(1, len(xs) // 2)], xs[len(xs) // 2:]]
    start = [0.5]
    for half in halves:
        mean, std = float(half.mean()), float(half.std())
        k = min(50.0, max(1.0, 1.2 * mean / std)) if std > 0 else 50.0  # Weibull CV ~ 1.2 / k
        start += [k, mean / gamma(1.0 + 1.0 / k)]
    return tuple(start)


def fit_weibull_mixture(x: Sequence[float] | np.ndarray, starts: Sequence[Sequence[float]] | None = None) -> WeibullMixture:
    """A two-component Weibull mixture fitted to positive data, high-mean component first.

    L-BFGS-B from each start (the authors' and one from the data, unless given); the likelier local
    optimum wins. The likelihood itself is unbounded, so this is a local optimum, not "the" MLE."""
    data = _positive(x)
    if data.size < 2:
        raise ValueError(f"a mixture fit needs at least 2 points, got {data.size}")
    best = None
    for start in starts or (PAPER_START, _data_start(data)):
        result = minimize(_nll_and_grad, np.asarray(start, dtype=float), args=(data,), jac=True,
                          method="L-BFGS-B", bounds=BOUNDS)
        if np.isfinite(result.fun) and (best is None or result.fun < best.fun):
            best = result
    if best is None:
        raise RuntimeError("the Weibull mixture fit diverged from every start")
    return WeibullMixture(*map(float, best.x)).high_first()


@lru_cache(maxsize=1 << 16)  # a benchmark's sweep revisits ~10^4 subsets
def _cached_fit(sorted_probabilities: tuple[float, ...]) -> WeibullMixture:
    # Several selectors (rpc, rpc_mean) prune the same subset; the fit ignores order, so key it sorted.
    return fit_weibull_mixture(sorted_probabilities)


def prune_mask(probabilities: Sequence[float], mixture: WeibullMixture | None = None) -> list[bool]:
    """Reasoning pruning over one problem's paths: True where a path is pruned, i.e. the low component
    is likelier for it (posterior < 1/2 for the high one) and it is strictly below the mean.

    `mixture` defaults to the two-start fit of these probabilities; with fewer than two paths, or
    none below the mean, nothing is pruned (and no fit is run)."""
    p = np.asarray(probabilities, dtype=float)
    below = p < p.mean() if p.size else np.zeros(0, dtype=bool)
    if p.size < 2 or not below.any():
        return [False] * int(p.size)
    mixture = (mixture or _cached_fit(tuple(sorted(p.tolist())))).high_first()
    high = mixture.posterior_high(p)
    return [bool(b and h < 0.5) for b, h in zip(below, high)]


def consistency_weights(probabilities: Sequence[float], texts: Sequence[str] | None,
                        pruned: Sequence[bool] | None = None) -> list[float]:
    """Each path's vote: its probability, or 0 when pruned or when an earlier unpruned path had the
    same completion text (distinct completions count once); `texts=None`: every path votes."""
    if (texts is not None and len(texts) != len(probabilities)) or (pruned is not None and len(pruned) != len(probabilities)):
        raise ValueError("probabilities, texts and pruned must have one entry per path")
    seen: set[str] = set()
    weights = []
    for i, p in enumerate(probabilities):
        text = texts[i] if texts is not None else None
        if (pruned is not None and pruned[i]) or (text is not None and text in seen):
            weights.append(0.0)
            continue
        if text is not None:
            seen.add(text)
        weights.append(float(p))
    return weights


def class_scores(classes: Sequence[int | None], weights: Sequence[float]) -> dict[int, float]:
    """Sum of the weights per answer class (paths without an answer belong to no class)."""
    totals: dict[int, float] = {}
    for c, w in zip(classes, weights):
        if c is not None:
            totals[c] = totals.get(c, 0.0) + w
    return totals


def rpc_weights(mean_logprobs: Sequence[float], texts: Sequence[str] | None = None,
                joint_logprobs: Sequence[float] | None = None, prune: bool = True) -> list[float]:
    """Per-path votes of one problem's paths. Pruning (when `prune`) on exp(mean log-prob); votes
    with joint probabilities of distinct texts when `joint_logprobs` are given (`rpc`, `pc`), else
    with the length-normalised probability of every kept path (`rpc_mean`)."""
    normalised = [math.exp(m) for m in mean_logprobs]
    pruned = prune_mask(normalised) if prune else [False] * len(normalised)
    if joint_logprobs is None:
        return consistency_weights(normalised, None, pruned)
    if len(joint_logprobs) != len(normalised):
        raise ValueError("mean_logprobs and joint_logprobs must have one entry per path")
    if texts is None:
        raise ValueError("perplexity consistency over joint probabilities needs the completion texts")
    kept = [j for j, out in zip(joint_logprobs, pruned) if not out]
    top = max(kept) if kept else 0.0  # the largest kept path gets 1: no underflow where it matters
    return consistency_weights([math.exp(j - top) for j in joint_logprobs], texts, pruned)


def rpc_scores(classes: Sequence[int | None], texts: Sequence[str], mean_logprobs: Sequence[float],
               joint_logprobs: Sequence[float] | None = None, prune: bool = True) -> dict[int, float]:
    """Perplexity-consistency mass of every answer class (see `rpc_weights`)."""
    return class_scores(classes, rpc_weights(mean_logprobs, texts, joint_logprobs, prune))
