"""BVPO's mixing weight: the closed-form MSE-optimal alpha and its running estimate from gradients.

The mixed gradient g_c = a g_t + (1 - a) g_e estimates mu = grad L_m (the trace-marginal objective).
With biases b_t, b_e against mu and (cross-)covariances S_t, S_e, S_te, MSE(a) = E||g_c - mu||^2 is a
quadratic in a whose minimiser, clipped to [0, 1], is (BVPO Theorem 2; the numerator's terms are
quoted by reviewers, the denominator is the standard derivation, unverified against the paper):

    a* = [tr(S_e - S_te) + ||b_e||^2 - b_t.b_e] / [tr(S_t + S_e - 2 S_te) + ||b_t - b_e||^2]

mu is never observable in training, so the running estimate takes mu = E[g_t] (b_t = 0: the trace
estimator is the Monte-Carlo estimate over traces; its own bias is unknowable here) and b_e =
E[g_e] - E[g_t]. Means and covariances come from the per-step gradients of the last `window` steps,
each reduced to a fixed random sample of coordinates (`GradientSketch`): traces and squared norms
are sums over coordinates, so a uniform coordinate sample estimates each up to one common factor,
which cancels in the ratio. The squared bias is corrected for the noise in the two window means.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch


def closed_form_alpha(trace_t: float, trace_e: float, trace_te: float, bias_t: torch.Tensor, bias_e: torch.Tensor,
                      fallback: float = 0.5) -> float:
    """a* from the three covariance traces and the two bias vectors, clipped to [0, 1]."""
    numerator = trace_e - trace_te + float(bias_e @ bias_e) - float(bias_t @ bias_e)
    gap = bias_t - bias_e
    denominator = trace_t + trace_e - 2 * trace_te + float(gap @ gap)
    if not denominator > 0:  # the two estimators agree exactly: any mix is as good
        return fallback
    return min(1.0, max(0.0, numerator / denominator))


def mixture_mse(alpha: float, trace_t: float, trace_e: float, trace_te: float, bias_t: torch.Tensor,
                bias_e: torch.Tensor) -> float:
    """MSE of a g_t + (1 - a) g_e against mu, from the same statistics (for checks and reports)."""
    bias = alpha * bias_t + (1 - alpha) * bias_e
    return alpha**2 * trace_t + (1 - alpha) ** 2 * trace_e + 2 * alpha * (1 - alpha) * trace_te + float(bias @ bias)


def gradient_statistics(g_t: torch.Tensor, g_e: torch.Tensor) -> dict[str, float | torch.Tensor]:
    """Sample statistics of paired gradient rows (n x d each): covariance traces and the mean gap."""
    n = g_t.shape[0]
    if n < 2:
        raise ValueError("gradient statistics need at least two samples")
    g_t, g_e = g_t.double(), g_e.double()
    mean_t, mean_e = g_t.mean(0), g_e.mean(0)
    dt, de = g_t - mean_t, g_e - mean_e
    trace_t = float((dt * dt).sum()) / (n - 1)
    trace_e = float((de * de).sum()) / (n - 1)
    trace_te = float((dt * de).sum()) / (n - 1)
    gap = mean_e - mean_t
    # E||mean_e - mean_t||^2 = ||b_e||^2 + tr(S_t + S_e - 2 S_te) / n: remove the noise part
    bias_sq = max(0.0, float(gap @ gap) - (trace_t + trace_e - 2 * trace_te) / n)
    return {"samples": n, "trace_t": trace_t, "trace_e": trace_e, "trace_te": trace_te, "bias_sq": bias_sq,
            "mean_t": mean_t, "mean_e": mean_e}


def estimate_alpha(g_t: torch.Tensor, g_e: torch.Tensor, fallback: float = 0.5) -> tuple[float, dict[str, float]]:
    """(a*, statistics) from paired gradient rows, taking mu = E[g_t] (see the module docstring)."""
    stats = gradient_statistics(g_t, g_e)
    trace_t, trace_e, trace_te, bias_sq = stats["trace_t"], stats["trace_e"], stats["trace_te"], stats["bias_sq"]
    denominator = trace_t + trace_e - 2 * trace_te + bias_sq
    alpha = fallback if not denominator > 0 else min(1.0, max(0.0, (trace_e - trace_te + bias_sq) / denominator))
    return alpha, {k: v for k, v in stats.items() if not isinstance(v, torch.Tensor)}


class AlphaEstimator:
    """Running a* over the sketched gradients of the last `window` steps; `fallback` until `min_samples`."""

    def __init__(self, window: int = 32, min_samples: int = 4, fallback: float = 0.5):
        if window < 2 or min_samples < 2:
            raise ValueError("the alpha window and min_samples must be at least 2")
        self.rows: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=window)
        self.min_samples, self.fallback = min_samples, fallback
        self.alpha, self.stats = fallback, {}

    def update(self, g_t: torch.Tensor, g_e: torch.Tensor) -> float:
        self.rows.append((g_t.detach().float().cpu(), g_e.detach().float().cpu()))
        if len(self.rows) >= self.min_samples:
            self.alpha, self.stats = estimate_alpha(torch.stack([r[0] for r in self.rows]),
                                                    torch.stack([r[1] for r in self.rows]), self.fallback)
        return self.alpha


class GradientSketch:
    """A fixed uniform random sample of `dim` coordinates of the parameters' gradient (all of them when
    `dim` is None or covers the model): cheap to keep per step, even for billions of parameters."""

    def __init__(self, params: Sequence[torch.nn.Parameter], dim: int | None, seed: int = 0):
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        self.full = dim is None or dim >= total
        self.index: list[torch.Tensor | None] = []
        if self.full:
            return
        generator = torch.Generator().manual_seed(seed)
        # how many sampled coordinates fall in each tensor: a multinomial split proportional to size
        picks = torch.randint(0, total, (dim,), generator=generator)
        bounds = torch.tensor([0] + sizes).cumsum(0)
        for i, size in enumerate(sizes):
            inside = picks[(picks >= bounds[i]) & (picks < bounds[i + 1])] - bounds[i]
            self.index.append(inside.sort().values if len(inside) else None)

    def __call__(self, grads: Sequence[torch.Tensor | None], params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
        pieces = []
        for i, (g, p) in enumerate(zip(grads, params)):
            if g is None:
                g = torch.zeros_like(p)
            flat = g.reshape(-1).float()
            if self.full:
                pieces.append(flat)
            elif self.index[i] is not None:
                pieces.append(flat[self.index[i].to(flat.device)])
        return torch.cat(pieces)
