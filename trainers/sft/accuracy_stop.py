"""Stop SFT once greedy accuracy on held-out problems reaches a target.

The arith tiny policy is meant to be mediocre: right often enough to learn from, wrong often
enough to improve. How many steps that takes swings with small recipe changes (a tiny model picks
up operand copying abruptly), so the recipe measures instead of guessing: every `every` steps it
decodes `problems` greedily with the model being trained and stops as soon as the share graded
correct reaches `target`. The problems are validation problems, never test ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from transformers import TrainerCallback
from treetune.rewards.grading import grade_many

log = logging.getLogger(__name__)


def greedy_accuracy(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], max_new_tokens: int = 96,
                    batch_size: int = 128) -> float:
    """Share of `prompts` whose greedy continuation grades equal to the answer (math-verify)."""
    import torch


    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True).to(model.device)
                generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                outputs += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    verdicts = grade_many(outputs, list(answers))
    return sum(verdicts) / max(1, len(verdicts))


class StopAtAccuracy(TrainerCallback):
    def __init__(self, tokenizer, prompts: Sequence[str], answers: Sequence[str], target: float, every: int):
        self.tokenizer, self.prompts, self.answers = tokenizer, prompts, answers
        self.target, self.every = target, every
        self.history: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every != 0 or model is None:
            return control
        accuracy = greedy_accuracy(model, self.tokenizer, self.prompts, self.answers)
        self.history.append((state.global_step, accuracy))
        log.info("step %d: greedy accuracy on %d held-out problems %.3f (stop at %.2f)",
                 state.global_step, len(self.prompts), accuracy, self.target)
        if accuracy >= self.target:
            control.should_training_stop = True
        return control
