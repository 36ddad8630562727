"""Training a discriminative process reward model (TRL 1.16 no longer ships a PRM trainer).

A PRM here is a backbone with a two-class token head (`AutoModelForTokenClassification`,
num_labels=2) read at the step separator: the TRL convention. The prompt's tokens come first,
then each step followed by the separator; the step's label sits on the separator's last token,
every other position is ignored (-100). Hard labels (bool) train with cross-entropy; soft labels
(floats in [0, 1], e.g. Monte Carlo estimates) with binary cross-entropy on
P(correct) = softmax(logits)[1], since casting them to int (as TRL's trainer did) would throw the
estimate away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import Trainer

IGNORE = -100.0


def tokenize_stepwise(record: dict, tokenizer, separator: str = "\n", max_length: int | None = None,
                      spans: bool = False) -> dict:
    """input_ids and float labels for one {prompt, completions, labels} record.

    Labels are floats: 1.0 / 0.0 for hard labels, the value itself for soft ones, -100 elsewhere.
    A step cut off by `max_length` loses its label with it. With `spans`, also `step_spans`: the
    [start, end) token positions of each kept step's text, its separator excluded.
    """
    ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        ids = [tokenizer.bos_token_id] + ids
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

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
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


def step_loss(logits: torch.Tensor, labels: torch.Tensor, soft: bool) -> torch.Tensor:
    """Mean loss over labelled positions: CE for hard labels, BCE on P(class 1) for soft ones."""
    mask = labels != IGNORE
    if not mask.any():
        return logits.sum() * 0.0
    picked = logits[mask].float()
    target = labels[mask]
    if soft:
        log_p = torch.log_softmax(picked, dim=-1)
        return -(target * log_p[:, 1] + (1 - target) * log_p[:, 0]).mean()
    return torch.nn.functional.cross_entropy(picked, (target > 0.5).long())


class PRMTrainer(Trainer):
    """`transformers.Trainer` with the step loss; every Trainer option (DeepSpeed, LoRA via a peft
    model, gradient checkpointing, report_to, resume) works unchanged."""

    def __init__(self, *args, soft_labels: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.soft_labels = soft_labels

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = step_loss(outputs.logits, labels, self.soft_labels)
        return (loss, outputs) if return_outputs else loss
