"""Scoring steps with a discriminative PRM trained by `treetune.trainers.prm` (a two-class token
head read at the step separator), and the PRM input format the trainer and the scorer share: a `StepScorer`. Where the PRM folder holds a fusion file
(`treetune.rewards.scorers.fusion`), the head's log-odds are fused with the backbone LM's likelihood
of each step; `fusion=False` scores with the head alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from treetune.rewards.scorers import fusion as prm_fusion

IGNORE = -100.0


def tokenize_stepwise(record: dict, tokenizer, separator: str = "\n", max_length: int | None = None,
                      spans: bool = False) -> dict:
    """input_ids and float labels for one {prompt, completions, labels} record.

    Labels are floats: 1.0 / 0.0 for hard labels, the value itself for soft ones, -100 elsewhere.
    A step cut off by `max_length` loses its label with it. With `spans`, also `step_spans`: the
    [start, end) token positions of each kept step's text, its separator excluded.
    """
    # special tokens as the tokenizer itself adds them (a BOS where it has one, as for Llama), never a
    # declared BOS it does not add: SmolLM2's is ChatML's `<|im_start|>`, which opens a chat turn
    ids = tokenizer(record["prompt"])["input_ids"]
    labels = [IGNORE] * len(ids)
    step_spans = []
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if not separator_ids:
        raise ValueError(f"the separator {separator!r} tokenizes to nothing")
    for step, label in zip(record["completions"], record["labels"]):
        step_ids = tokenizer(step, add_special_tokens=False)["input_ids"] + separator_ids
        step_spans.append((len(ids), len(ids) + len(step_ids) - len(separator_ids)))
        ids += step_ids
        labels += [IGNORE] * (len(step_ids) - 1) + [float(label)]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    if spans:
        kept = sum(1 for label in labels if label != IGNORE)
        return {"input_ids": ids, "labels": labels, "step_spans": step_spans[:kept]}
    return {"input_ids": ids, "labels": labels}


@dataclass
class PRMCollator:
    pad_token_id: int

    def __call__(self, rows: Sequence[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.float)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = torch.tensor(r["input_ids"])
            attention[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"], dtype=torch.float)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


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
