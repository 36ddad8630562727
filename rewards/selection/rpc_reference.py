"""RPC as its authors compute it: the reference beside treetune's variant (`rpc.py`).

Follows `compute_rpc.py`, function `wpc_evaluator`, of the authors' code (github.com/WNJXYK/RPC),
formula for formula, so that a figure of `rpc_reference` is a figure of their method:

- A path's probability is length-normalised: p = exp(mean token log-prob).
- Reasoning pruning fits w Weib(k1, lam1) + (1 - w) Weib(k2, lam2) to the p of all m paths with
  one call of scipy's L-BFGS-B: the densities written out (no log space), gradients by finite
  differences, the single start [0.5, 1, 1, 1.5, 2], bounds w in [0.2, 0.8] and k, lam >= 0.01.
  The component of larger mean lam Gamma(1 + 1/k) is the high one. A path is pruned iff its
  membership of the high component is below the low one's and p < mean(p); a membership the
  densities leave undefined (0 / 0) prunes nothing, as the comparison is false there.
- Perplexity consistency: each answer group's mass is the sum, over the distinct completion texts
  of its unpruned paths, of the distinct p values seen with that text (the code keeps a set of p
  per text), so a completion repeated word for word counts once. Pruned paths add nothing.
- Paths without an answer form one group of their own, as the code's string-equal "[Invalid]"
  predictions do; it can win, and then the answer is wrong.
- The groups of largest mass (exact float ties) share the credit: each tied right group adds
  1 / (number tied).

Answer groups here are the math-verify equivalence classes of `best_of_n.assign_answer_classes`
where the code unites answers by its own `math_equal`; everything else is the code's arithmetic.
With no path below the mean nothing can be pruned, so the fit is skipped there (same result).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import minimize
from scipy.special import gamma

START = (0.5, 1.0, 1.0, 1.5, 2.0)  # w, k1, lam1, k2, lam2, compute_rpc.py's initial_guess
BOUNDS = ((0.2, 0.8), (0.01, None), (0.01, None), (0.01, None), (0.01, None))
NO_ANSWER = ("no answer",)  # the group key of the paths without an answer


def weibull_pdf(x, k: float, lam: float):
    """The Weibull density as the code writes it (overflow and 0 * inf give inf / nan, as there)."""
    return (k / lam) * (x / lam) ** (k - 1) * np.exp(-((x / lam) ** k))


def weibull_mean(k: float, lam: float) -> float:
    return lam * gamma(1 + 1 / k)


def negative_log_likelihood(params: np.ndarray, data: np.ndarray) -> float:
    w1, k1, lam1, k2, lam2 = params
    with np.errstate(all="ignore"):
        return -np.sum(np.log(w1 * weibull_pdf(data, k1, lam1) + (1 - w1) * weibull_pdf(data, k2, lam2)))


@dataclass(frozen=True)
class ReferenceFit:
    """The fitted mixture, high-mean component first (w is the high component's weight)."""

    w: float
    k1: float
    lam1: float
    k2: float
    lam2: float

    def high_membership(self, x) -> np.ndarray:
        """P(high | x) = w f1 / (w f1 + (1 - w) f2); nan where both densities vanish."""
        x = np.asarray(x, dtype=float)
        with np.errstate(all="ignore"):
            high = self.w * weibull_pdf(x, self.k1, self.lam1)
            return high / (high + (1 - self.w) * weibull_pdf(x, self.k2, self.lam2))


def fit(probabilities: Sequence[float]) -> ReferenceFit:
    """compute_rpc.py's fit: one L-BFGS-B run from START within BOUNDS, then relabelled high-first."""
    data = np.asarray(probabilities, dtype=float)
    with np.errstate(all="ignore"):  # inf - inf in the finite differences, as in the code: warned there, silent here
        result = minimize(negative_log_likelihood, np.asarray(START), args=(data,), method="L-BFGS-B", bounds=BOUNDS)
    w1, k1, lam1, k2, lam2 = (float(v) for v in result.x)
    with np.errstate(all="ignore"):
        swap = weibull_mean(k1, lam1) < weibull_mean(k2, lam2)
    if swap:
        k1, lam1, k2, lam2 = k2, lam2, k1, lam1
        w1 = 1 - w1
    return ReferenceFit(w1, k1, lam1, k2, lam2)


@lru_cache(maxsize=1 << 16)  # a benchmark's sweep revisits ~10^4 subsets
def _cached_fit(probabilities: tuple[float, ...]) -> ReferenceFit:
    return fit(probabilities)


def prune_mask(probabilities: Sequence[float], mixture: ReferenceFit | None = None) -> list[bool]:
    """True where compute_rpc.py prunes a path: membership p1 < p2 (= 1 - p1) and p < mean(p)."""
    p = np.asarray(probabilities, dtype=float)
    if p.size == 0:
        return []
    below = p < np.mean(p)
    if not below.any():
        return [False] * int(p.size)
    mixture = mixture or _cached_fit(tuple(p.tolist()))
    p1 = mixture.high_membership(p)
    with np.errstate(invalid="ignore"):
        low_likelier = p1 < 1 - p1  # False where p1 is nan
    return [bool(b and lo) for b, lo in zip(below, low_likelier)]


def group_masses(groups: Sequence[Hashable], texts: Sequence[str], probabilities: Sequence[float],
                 pruned: Sequence[bool]) -> dict[Hashable, float]:
    """Each group's mass: over its unpruned paths, the distinct p values of each distinct text, summed."""
    if not len(groups) == len(texts) == len(probabilities) == len(pruned):
        raise ValueError("groups, texts, probabilities and pruned must have one entry per path")
    seen: dict[Hashable, dict[str, set[float]]] = {}
    for group, text, p, out in zip(groups, texts, probabilities, pruned):
        by_text = seen.setdefault(group, {})
        if not out:
            by_text.setdefault(text, set()).add(float(p))
    return {group: float(sum(sum(values) for values in by_text.values())) for group, by_text in seen.items()}


@dataclass(frozen=True)
class ReferenceChoice:
    """One problem under the reference: group masses, the tied winners, the pruning."""

    masses: dict[Hashable, float]
    winners: list[Hashable]  # groups of the largest mass, in order of first appearance
    pruned: list[bool]

    def credit(self, right: dict[Hashable, bool]) -> float:
        """The code's accuracy credit: 1 / (number tied) for each tied group that is right."""
        return sum(1.0 for g in self.winners if right.get(g, False)) / len(self.winners) if self.winners else 0.0


def choose(groups: Sequence[Hashable], texts: Sequence[str], mean_logprobs: Sequence[float]) -> ReferenceChoice:
    """compute_rpc.py's `wpc_evaluator` for one problem's paths (its group keys, texts and mean log-probs)."""
    probabilities = np.exp(np.asarray(mean_logprobs, dtype=float))
    pruned = prune_mask(probabilities)
    masses = group_masses(groups, texts, probabilities.tolist(), pruned)
    top = max(masses.values(), default=0.0)
    return ReferenceChoice(masses, [g for g, m in masses.items() if m >= top], pruned)
