"""Scoring steps with a discriminative PRM trained by `treetune.trainers.prm` (a two-class token
head read at the step separator): a `StepScorer`."""

from __future__ import annotations

from collections.abc import Sequence

from treetune.trainers.prm import tokenize_stepwise


class DiscriminativePRM:
    """P(correct) at each step's separator, batched with padding to the longest input."""

    def __init__(self, path: str, separator: str = "\n", batch_size: int = 32, device: str | None = None,
                 max_length: int | None = None, name: str = "prm"):
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        self.name, self.separator, self.batch_size, self.max_length = name, separator, batch_size, max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForTokenClassification.from_pretrained(path).to(self.device).eval()
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
        import torch

        from treetune.trainers.prm import IGNORE, PRMCollator

        rows = [tokenize_stepwise({"prompt": p + "\n", "completions": list(steps), "labels": [1.0] * len(steps)},
                                  self.tokenizer, self.separator, self.max_length)
                for p, steps in zip(problems, solutions)]
        collate = PRMCollator(self.pad)
        out: list[list[float]] = []
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                batch = collate(rows[start:start + self.batch_size])
                labels = batch.pop("labels")
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float()
                probs = torch.softmax(logits, dim=-1)[..., 1].cpu()
                for i in range(len(labels)):
                    out.append(probs[i][labels[i] != IGNORE].tolist())
        # a step cut off by max_length gets no score: count it as wrong rather than drop it
        return [s + [0.0] * (len(steps) - len(s)) for s, steps in zip(out, solutions)]
