"""A PRM that adds the backbone's own likelihood of each step to its separator head.

Why: on arith a two-class head read at the separator learns to check a step's arithmetic far too
slowly from the tiny backbone (ProcessBench-style F1 0.37 after 3 epochs on 5,327 solutions), yet
the backbone's LM head already knows: the lowest token probability in a step, untrained, reaches
F1 0.74 on the same held-out solutions. The knowledge sits at the step's own tokens, where the LM
predicted them, not at the separator. A fused PRM reads both.

Step i of a solution gets P(correct) = sigmoid(w . f_i + b) with the features

    head_logit       log-odds of the separator head, logit[1] - logit[0]
    step_min_logp    lowest log-probability of a token of step i under the frozen backbone LM
    step_mean_logp   mean log-probability of the tokens of step i
    prefix_min_logp  lowest token log-probability over steps 0..i (a step after an error is wrong
                     too when labels cover the whole solution)

w and b are fitted by logistic regression on MC labels of records held out from the head's
training (a head scored on its own training data would look better than it is). Log-probabilities
are floored at LOGP_FLOOR so one near-impossible token cannot dominate the fit. The separator's own
tokens are left out: after the last step the LM expects end of text, not the separator.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

FUSION_FILE = "fusion.json"
FEATURES = ("head_logit", "step_min_logp", "step_mean_logp", "prefix_min_logp")
LIKELIHOOD_FEATURES = FEATURES[1:]
LOGP_FLOOR = -15.0


def step_log_probs(model, rows: Sequence[dict], pad_token_id: int, batch_size: int = 32) -> list[list[tuple[float, float]]]:
    """(min, mean) token log-probability of each step of each tokenized row under a causal LM.

    `rows` come from `tokenize_stepwise(..., spans=True)`: `input_ids` and `step_spans`, the
    [start, end) token positions of each step's text without its separator.
    """
    import torch

    device = next(model.parameters()).device
    out: list[list[tuple[float, float]]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):
                ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
                mask[i, :len(r["input_ids"])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            # log-probability of token j, predicted at position j - 1
            token_logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None].to(device))[..., 0].cpu()
            for i, r in enumerate(batch):
                steps = []
                for a, b in r["step_spans"]:
                    values = token_logp[i, a - 1:b - 1].clamp_min(LOGP_FLOOR) if b > a else torch.tensor([0.0])
                    steps.append((values.min().item(), values.mean().item()))
                out.append(steps)
    return out


def likelihood_features(step_logps: Sequence[tuple[float, float]]) -> list[list[float]]:
    """The three likelihood features of every step of one solution."""
    features, prefix_min = [], 0.0
    for low, mean in step_logps:
        prefix_min = min(prefix_min, low)
        features.append([low, mean, prefix_min])
    return features


def fit(features: Sequence[Sequence[float]], targets: Sequence[float], names: Sequence[str], l2: float = 1e-3) -> dict:
    """Logistic regression (scipy L-BFGS) of targets in [0, 1] on step features; standardised
    for the fit, weights returned on the raw features."""
    import numpy as np
    from scipy.optimize import minimize

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != len(names):
        raise ValueError(f"features {x.shape} do not match {len(y)} targets and {len(names)} names")
    if len(y) < 10 or y.min() == y.max():
        raise ValueError(f"cannot fit a fusion on {len(y)} steps whose labels are all {y[0] if len(y) else None}")
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)
    z = (x - mean) / std

    def loss(theta):
        logit = z @ theta[:-1] + theta[-1]
        p = 1.0 / (1.0 + np.exp(-logit))
        value = np.mean(np.logaddexp(0.0, logit) - y * logit) + l2 * theta[:-1] @ theta[:-1]
        grad = np.append(z.T @ (p - y) / len(y) + 2 * l2 * theta[:-1], np.mean(p - y))
        return value, grad

    found = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B")
    weights = found.x[:-1] / std
    bias = found.x[-1] - weights @ mean
    prior = y.mean()
    return {"features": list(names), "weights": weights.tolist(), "bias": float(bias), "fit_steps": int(len(y)),
            "fit_loss": float(found.fun), "prior_loss": float(-(prior * math.log(prior) + (1 - prior) * math.log(1 - prior)))}


def apply(fusion: dict, features: Sequence[Sequence[float]]) -> list[float]:
    """P(correct) per step from feature rows ordered as `fusion["features"]`."""
    out = []
    for row in features:
        logit = fusion["bias"] + sum(w * v for w, v in zip(fusion["weights"], row))
        out.append(1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, logit)))))
    return out


def save(fusion: dict, prm_dir: str | Path) -> Path:
    path = Path(prm_dir) / FUSION_FILE
    path.write_text(json.dumps(fusion, indent=2))
    return path


def load(prm_dir: str | Path) -> dict | None:
    path = Path(prm_dir) / FUSION_FILE
    if not path.exists():
        return None
    fusion = json.loads(path.read_text())
    unknown = set(fusion.get("features", [])) - set(FEATURES)
    if unknown or "lm" not in fusion or len(fusion.get("weights", [])) != len(fusion.get("features", [])):
        raise ValueError(f"{path}: not a fusion file (features {fusion.get('features')}, needs 'lm' and one weight per feature)")
    return fusion
