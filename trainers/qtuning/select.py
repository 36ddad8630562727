"""Q-Tuning's selection rules (Wang et al. 2025, arXiv:2509.23873) as pure functions over score arrays.

The trainer (`treetune.trainers.qtuning.trainer`) scores a mini-batch with the current model and calls
these; they hold no model and no state, so each rule is tested on hand-made numbers.

- Error-Uncertainty plane: a sample's perplexity (PPL) and mean predictive entropy (Ent) over its
  answer tokens. With quantile thresholds at share `alpha` (the paper's alpha = beta, updated
  together): Q1 harmful noise (PPL > Q_{1-a}, Ent > Q_{1-a}), Q2 valuable misconception
  (PPL > Q_{1-a}, Ent < Q_a), Q3 redundant knowledge (PPL < Q_a, Ent < Q_a), Q4 calibration
  (PPL < Q_a, Ent > Q_{1-a}); samples in the middle bands belong to no quadrant.
- `alpha` is found by bisection on [0, 0.49] (Algorithm 1) as the smallest tested value whose
  Q2 + Q4 reach the budget floor(r_sample * |B|) (at least one sample).
- The kept set is exactly that budget. The paper leaves two edges open; the choices here:
  * more Q2 + Q4 than the budget (quadrant sizes move in jumps on a batch of 8): the ones farthest
    off the diagonal, by supp = |PPL^ - Ent^| (min-max normalised within the batch), are kept;
  * fewer (even alpha = 0.49 does not reach it): the paper's fallback tops up from Q1 + Q3 by the
    same supp score, highest first, then (never in practice) from the unassigned middle.
- Token pruning applies to kept samples on the high-error side (PPL above the batch median): that
  is every Q2 sample and a Q1 top-up; Q4 and Q3 top-ups keep every token.
- Token score: s_i = (1 - l) * PPL_i + l * (PPL_{i-1} + PPL_{i+1}) with l = 0.5 (the paper's
  equation, no /2 on the neighbour sum). Neighbours are the adjacent *answer* tokens; at an edge
  the missing neighbour is the token itself, so edge and interior scores share one scale. The
  floor(r_token * |T|) tokens (at least one) with the lowest s_i are kept: high local perplexity
  marks a harmful token (the paper's "reversed PPL" ablation, keeping high-PPL tokens, is worse).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NONE, Q1, Q2, Q3, Q4 = 0, 1, 2, 3, 4
QUADRANT_NAMES = {Q1: "q1_harmful_noise", Q2: "q2_misconception", Q3: "q3_redundant", Q4: "q4_calibration",
                  NONE: "unassigned"}
MAX_ALPHA = 0.49


def budget(n: int, ratio: float) -> int:
    """floor(ratio * n), at least 1 when n > 0: every rank always trains on something."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"a keep ratio must be in (0, 1], got {ratio}")
    return max(1, int(np.floor(ratio * n + 1e-9))) if n > 0 else 0


def quadrants(ppl: np.ndarray, ent: np.ndarray, alpha: float) -> np.ndarray:
    """The quadrant (Q1..Q4, or NONE) of each sample for quantile share `alpha` (= beta)."""
    ppl, ent = np.asarray(ppl, dtype=np.float64), np.asarray(ent, dtype=np.float64)
    if ppl.shape != ent.shape or ppl.ndim != 1:
        raise ValueError(f"ppl and ent must be 1-D of one length, got {ppl.shape} and {ent.shape}")
    ppl_lo, ppl_hi = np.quantile(ppl, alpha), np.quantile(ppl, 1.0 - alpha)
    ent_lo, ent_hi = np.quantile(ent, alpha), np.quantile(ent, 1.0 - alpha)
    out = np.full(ppl.shape, NONE, dtype=np.int64)
    out[(ppl > ppl_hi) & (ent > ent_hi)] = Q1
    out[(ppl > ppl_hi) & (ent < ent_lo)] = Q2
    out[(ppl < ppl_lo) & (ent < ent_lo)] = Q3
    out[(ppl < ppl_lo) & (ent > ent_hi)] = Q4
    return out


def kept_quadrant_count(ppl: np.ndarray, ent: np.ndarray, alpha: float) -> int:
    q = quadrants(ppl, ent, alpha)
    return int(np.sum((q == Q2) | (q == Q4)))


def bisect_alpha(ppl: np.ndarray, ent: np.ndarray, target: int, iterations: int = 10,
                 max_alpha: float = MAX_ALPHA) -> tuple[float, bool]:
    """(alpha, met): the smallest bisection point whose Q2 + Q4 hold `target` samples, or
    (max_alpha, False) when none does. Q2 + Q4 only grow with alpha, so bisection applies."""
    low, high, best = 0.0, max_alpha, None
    for _ in range(iterations):
        alpha = (low + high) / 2
        if kept_quadrant_count(ppl, ent, alpha) < target:
            low = alpha  # too few kept: widen the bands
        else:
            high = best = alpha
    if best is None:
        return (max_alpha, True) if kept_quadrant_count(ppl, ent, max_alpha) >= target else (max_alpha, False)
    return best, True


def supp_scores(ppl: np.ndarray, ent: np.ndarray) -> np.ndarray:
    """|PPL^ - Ent^| with both min-max normalised in the batch: how far off the diagonal a sample sits."""
    def normalised(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 0 else np.zeros_like(x)

    return np.abs(normalised(ppl) - normalised(ent))


@dataclass
class SampleSelection:
    """Which samples of a batch train, and why."""

    kept: np.ndarray  # sorted indices into the batch
    quadrant: np.ndarray  # per sample, at the chosen alpha
    prune_tokens: np.ndarray  # per kept sample (aligned with `kept`): token-prune it?
    alpha: float
    topped_up: int = 0  # kept samples taken from outside Q2 + Q4 by the fallback
    trimmed: int = 0  # Q2 + Q4 samples left out because the quadrants overshot the budget
    counts: dict[str, int] = field(default_factory=dict)


def select_samples(ppl: np.ndarray, ent: np.ndarray, sample_ratio: float, iterations: int = 10,
                   max_alpha: float = MAX_ALPHA) -> SampleSelection:
    """Q-Tuning's sample selection on one mini-batch: exactly `budget(len(ppl), sample_ratio)` samples."""
    ppl, ent = np.asarray(ppl, dtype=np.float64), np.asarray(ent, dtype=np.float64)
    if not (np.all(np.isfinite(ppl)) and np.all(np.isfinite(ent))):
        raise ValueError("perplexities and entropies must be finite")
    n = len(ppl)
    target = budget(n, sample_ratio)
    alpha, _ = bisect_alpha(ppl, ent, target, iterations, max_alpha)
    quadrant = quadrants(ppl, ent, alpha)
    supp = supp_scores(ppl, ent)
    order = lambda idx: idx[np.argsort(-supp[idx], kind="stable")]  # noqa: E731  highest supp first
    core = order(np.flatnonzero((quadrant == Q2) | (quadrant == Q4)))
    trimmed = max(0, len(core) - target)
    chosen = list(core[:target])
    topped_up = 0
    if len(chosen) < target:
        pool = list(order(np.flatnonzero((quadrant == Q1) | (quadrant == Q3)))) + list(order(np.flatnonzero(quadrant == NONE)))
        extra = pool[: target - len(chosen)]
        topped_up = len(extra)
        chosen += extra
    kept = np.sort(np.asarray(chosen, dtype=np.int64))
    high_error = ppl > np.median(ppl)
    counts = {name: int(np.sum(quadrant == q)) for q, name in QUADRANT_NAMES.items()}
    return SampleSelection(kept=kept, quadrant=quadrant, prune_tokens=high_error[kept], alpha=alpha,
                           topped_up=topped_up, trimmed=trimmed, counts=counts)


def smoothed_token_scores(token_ppl: np.ndarray, smoothing: float = 0.5) -> np.ndarray:
    """s_i = (1 - l) * PPL_i + l * (PPL_{i-1} + PPL_{i+1}); a missing edge neighbour is PPL_i itself."""
    p = np.asarray(token_ppl, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"token perplexities must be 1-D, got shape {p.shape}")
    if len(p) == 0:
        return p.copy()
    left = np.concatenate([p[:1], p[:-1]])
    right = np.concatenate([p[1:], p[-1:]])
    return (1.0 - smoothing) * p + smoothing * (left + right)


def token_keep_mask(token_nll: np.ndarray, token_ratio: float, smoothing: float = 0.5) -> np.ndarray:
    """Which answer tokens of a pruned sample stay in the loss: the `budget(|T|, token_ratio)`
    lowest smoothed scores (ties keep the earlier token)."""
    nll = np.asarray(token_nll, dtype=np.float64)
    keep = np.zeros(len(nll), dtype=bool)
    if len(nll) == 0:
        return keep
    # PPL_i = exp(NLL_i); clipped so a near-impossible token cannot overflow (it still ranks last).
    scores = smoothed_token_scores(np.exp(np.minimum(nll, 700.0)), smoothing)
    keep[np.argsort(scores, kind="stable")[: budget(len(nll), token_ratio)]] = True
    return keep
