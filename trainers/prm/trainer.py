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

import torch
from transformers import Trainer
from treetune.rewards.scorers.discriminative import IGNORE, PRMCollator, tokenize_stepwise  # noqa: F401 (re-exported)


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
