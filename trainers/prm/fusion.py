"""Fitting the PRM's likelihood fusion: the trained head combined with the backbone LM's
likelihood of each step, fitted on records held out of the head's training
(the fusion itself lives in `treetune.rewards.scorers.fusion`)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from treetune.rewards.scorers import fusion as prm_fusion
from treetune.rewards.scorers.discriminative import DiscriminativePRM

log = logging.getLogger(__name__)


def split_holdout(records: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(records for the head, records held out for the fusion fit), a seeded shuffle."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"fusion_holdout must lie in (0, 1), got {share}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(records) * share))
    held = set(order[:cut])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def fit_fusion(prm_dir: str | Path, backbone: str, records: list[dict], separator: str, max_length: int,
               features: list[str]) -> dict:
    """Fit and save the head/likelihood fusion of a trained PRM on held-out labelled records."""
    unknown = [f for f in features if f not in prm_fusion.FEATURES]
    if unknown:
        raise ValueError(f"unknown fusion features {unknown}; choose from {', '.join(prm_fusion.FEATURES)}")
    scorer = DiscriminativePRM(str(prm_dir), separator=separator, max_length=max_length, fusion=False, likelihood_lm=backbone)
    rows = scorer.rows([r["prompt"] for r in records], [r["completions"] for r in records])
    columns = [prm_fusion.FEATURES.index(f) for f in features]
    x, y = [], []
    for record, steps in zip(records, scorer.features(rows)):
        for label, row in zip(record["labels"], steps):
            x.append([row[c] for c in columns])
            y.append(float(label))
            # fit on steps up to the first wrong one: what first-error detection and search ask of a
            # PRM (on arith, fitting on later steps too lowered held-out F1 from 0.75 to 0.70)
            if float(label) < 0.5:
                break
    fusion = dict(prm_fusion.fit(x, y, features), lm=backbone)
    prm_fusion.save(fusion, prm_dir)
    log.info("fusion fitted on %d held-out steps: loss %.4f (label prior %.4f), weights %s", fusion["fit_steps"],
             fusion["fit_loss"], fusion["prior_loss"], dict(zip(features, [round(w, 3) for w in fusion["weights"]])))
    return fusion
