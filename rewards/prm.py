"""Scoring steps with a discriminative PRM trained by `treetune.trainers.prm` (a two-class token
head read at the step separator): a `StepScorer`. Where the PRM folder holds a fusion file
(`treetune.rewards.prm_fusion`), the head's log-odds are fused with the backbone LM's likelihood
of each step; `fusion=False` scores with the head alone."""

from __future__ import annotations

from collections.abc import Sequence

from treetune.trainers.prm import tokenize_stepwise

from . import prm_fusion


class DiscriminativePRM:
    """P(correct) at each step's separator, batched with padding to the longest input."""

    def __init__(self, path: str, separator: str = "\n", batch_size: int = 32, device: str | None = None,
                 max_length: int | None = None, name: str = "prm", fusion: bool = True, likelihood_lm: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

        self.name, self.separator, self.batch_size, self.max_length = name, separator, batch_size, max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForTokenClassification.from_pretrained(path).to(self.device).eval()
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.fusion = prm_fusion.load(path) if fusion else None
        # the LM behind the likelihood features: the fusion's, or given (to compute features for a fit)
        if likelihood_lm is None and self.fusion is not None and set(self.fusion["features"]) & set(prm_fusion.LIKELIHOOD_FEATURES):
            likelihood_lm = self.fusion["lm"]
        self.lm = AutoModelForCausalLM.from_pretrained(likelihood_lm).to(self.device).eval() if likelihood_lm else None

    def rows(self, prompts: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[dict]:
        """Tokenized rows; `prompts` as the PRM was trained on them (the question and a newline)."""
        return [tokenize_stepwise({"prompt": p, "completions": list(steps), "labels": [1.0] * len(steps)},
                                  self.tokenizer, self.separator, self.max_length, spans=True)
                for p, steps in zip(prompts, solutions)]

    def head_log_odds(self, rows: Sequence[dict]) -> list[list[float]]:
        """logit[1] - logit[0] of the separator head at each kept step."""
        import torch

        from treetune.trainers.prm import IGNORE, PRMCollator

        collate = PRMCollator(self.pad)
        out: list[list[float]] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                batch = collate(rows[start:start + self.batch_size])
                labels = batch.pop("labels")
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float().cpu()
                odds = logits[..., 1] - logits[..., 0]
                for i in range(len(labels)):
                    out.append(odds[i][labels[i] != IGNORE].tolist())
        return out

    def features(self, rows: Sequence[dict]) -> list[list[list[float]]]:
        """Every fusion feature (prm_fusion.FEATURES order) of every kept step."""
        heads = self.head_log_odds(rows)
        if self.lm is None:
            return [[[h, 0.0, 0.0, 0.0] for h in head] for head in heads]
        logps = prm_fusion.step_log_probs(self.lm, rows, self.pad, self.batch_size)
        return [[[h, *f] for h, f in zip(head, prm_fusion.likelihood_features(lp))] for head, lp in zip(heads, logps)]

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
        import math

        rows = self.rows([p + "\n" for p in problems], solutions)
        if self.fusion is None:
            out = [[1.0 / (1.0 + math.exp(-h)) for h in head] for head in self.head_log_odds(rows)]
        else:
            columns = [prm_fusion.FEATURES.index(f) for f in self.fusion["features"]]
            out = [prm_fusion.apply(self.fusion, [[row[c] for c in columns] for row in steps]) for steps in self.features(rows)]
        # a step cut off by max_length gets no score: count it as wrong rather than drop it
        return [s + [0.0] * (len(steps) - len(s)) for s, steps in zip(out, solutions)]
