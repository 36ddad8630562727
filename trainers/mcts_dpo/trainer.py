"""MCTS-DPO's training step: conservative DPO (cDPO) on MCTS step pairs with a label smoothing per
pair, a thin subclass of the Step-DPO trainer (and so of TRL's `DPOTrainer`).

The loss of a pair with smoothing eps is -(1 - eps) logsig(beta h) - eps logsig(-beta h), h the
difference of the chosen and rejected log-ratios against the reference. TRL's "sigmoid" loss is
the eps = 0 case (TRL 1.16 ignores `label_smoothing` there), and since
logsig(x) - logsig(-x) = x the cDPO loss is exactly TRL's sigmoid loss plus eps * beta * h. So
TRL computes everything as usual (policy forward, its reference-model handling under ZeRO-3, PEFT,
precomputed reference log-probs, metrics) and this trainer only adds mean(eps * beta * h) (times
the sigmoid term's loss weight), with h rebuilt from the log-probs of the very forward passes TRL
made: the policy and reference models are wrapped for the duration of one loss call so their
outputs can be read. Other TRL loss terms in `loss_type` (e.g. ["sigmoid", "sft"]: an SFT term on
the chosen steps, weighted by `loss_weights`) keep working unchanged.

eps comes from the pair's `label_smoothing` column (visit counts, see `mcts_pairs`), or, when
`conservative` is off, the config's global `label_smoothing`. The reference is an explicit model
(`ref_model_path`, the starting policy of the iteration), never the current round's start.
Prompt ids, chosen ids and rejected ids are the tree's own tokens (no EOS added, as in Step-DPO).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from treetune.trainers.common import (
    load_model,
    load_policy,
    peft_config,
    run_metrics,
    train_and_save,
    write_metrics,
    write_recipe,
)
from treetune.trainers.mcts_dpo.config import MCTSDPOConfig
from treetune.trainers.step_dpo.trainer import StepDPOTrainer

log = logging.getLogger(__name__)


class _Capture:
    """Stands in for a model during one loss call and keeps the outputs of its forward passes."""

    def __init__(self, model):
        self.model, self.outputs = model, []

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.outputs.append(out)
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


class SmoothingCollator:
    """Adds each pair's `label_smoothing` to the batch TRL's preference collator builds."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        if "label_smoothing" in examples[0]:
            batch["label_smoothing"] = torch.tensor([float(e["label_smoothing"]) for e in examples])
        return batch


class MCTSDPOTrainer(StepDPOTrainer):
    """cDPO with a label smoothing per pair (see the module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "sigmoid" not in self.loss_types:
            raise ValueError(f"MCTS-DPO smooths the 'sigmoid' DPO loss; loss_type={self.loss_types} has none")
        if self.ld_alpha is not None or self.f_divergence_type != "reverse_kl" or self.use_weighting:
            raise ValueError("per-pair label smoothing is defined for plain DPO log-ratios: "
                             "leave ld_alpha, f_divergence_type and use_weighting at their defaults")
        self.data_collator = SmoothingCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "label_smoothing" not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + ["label_smoothing"]

    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if k != "label_smoothing"}
        return super().compute_ref_log_probs(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        eps = inputs.pop("label_smoothing", None)
        if eps is None:
            eps = torch.full((inputs["input_ids"].size(0) // 2,), float(self.args.label_smoothing))
        policy = _Capture(model)
        ref_model = self.ref_model
        if ref_model is not None:
            self.ref_model = _Capture(ref_model)
        try:
            result = super()._compute_loss(policy, inputs, return_outputs)
        finally:
            captured_ref, self.ref_model = self.ref_model, ref_model
        seq_len = inputs["completion_mask"].size(1) - 1
        logps = policy.outputs[0].log_probs[:, -seq_len:].sum(dim=1)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif isinstance(captured_ref, _Capture) and captured_ref.outputs:
            ref_chosen, ref_rejected = captured_ref.outputs[0].log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
        else:
            raise ValueError("MCTS-DPO needs an explicit reference model (ref_model_path) or precomputed reference log-probs")
        chosen, rejected = logps.chunk(2, dim=0)
        h = (chosen - ref_chosen.to(chosen.dtype)) - (rejected - ref_rejected.to(rejected.dtype))
        eps = eps.to(h.device, h.dtype)
        weight = self.loss_weights[self.loss_types.index("sigmoid")]
        extra = weight * (eps * self.beta * h).mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["label_smoothing"].append(self.accelerator.gather_for_metrics(eps).mean().item())
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra


def pair_rows(pairs, max_length: int | None, max_prompt_length: int | None, conservative: bool,
              label_smoothing: float = 0.0):
    """(`datasets.Dataset`, report): the pairs' own token ids (from `mcts_pairs`), truncated like
    Step-DPO (the prompt's start goes first, the steps never), with each pair's smoothing."""
    from datasets import Dataset

    rows, dropped, truncated = [], [], 0
    for index, pair in enumerate(pairs):
        missing = [k for k in ("prompt_ids", "chosen_ids", "rejected_ids", "label_smoothing") if k not in pair.extra]
        if missing:
            raise ValueError(f"pair {index + 1} ({pair.problem_id}): no {', '.join(missing)}; "
                             "MCTS-DPO trains on pairs from treetune.trainers.mcts_dpo.pairs")
        prompt_ids, chosen_ids, rejected_ids = (list(pair.extra[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        longer = max(len(chosen_ids), len(rejected_ids))
        cut = False
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids, cut = prompt_ids[-max_prompt_length:], True
        if max_length is not None and len(prompt_ids) + longer > max_length:
            room = max_length - longer
            if room < 1:
                dropped.append(pair.problem_id)
                continue
            prompt_ids, cut = prompt_ids[-room:], True
        truncated += cut
        rows.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
                     "length": len(prompt_ids) + longer,
                     "label_smoothing": float(pair.extra["label_smoothing"]) if conservative else label_smoothing})
    if dropped:
        log.warning("%d pair(s) longer than max_length=%s were left out, e.g. %s", len(dropped), max_length, dropped[:5])
    if not rows:
        raise ValueError("no MCTS pair fits max_length; raise --max_length")
    return Dataset.from_list(rows), {"pairs": len(rows), "prompt_truncated": truncated, "too_long": len(dropped)}


def train_on_pairs(pairs, config: MCTSDPOConfig, model_args, policy: str, out: Path) -> dict:
    """One round's cDPO from `policy` against `config.ref_model_path`; saves a vLLM-loadable model,
    its `recipe.json` and `metrics.json` in `out` (checkpoints go to `config.output_dir`)."""
    from transformers import set_seed

    set_seed(config.seed)
    _, tokenizer, model = load_policy(model_args, path=policy)
    # TRL prepares an explicit reference like its own (ZeRO-3 / FSDP / DDP) and precomputes with it
    ref = load_model(config.ref_model_path, model_args) if config.ref_model_path else None
    dataset, report = pair_rows(pairs, config.max_length, config.max_prompt_length, config.conservative,
                                config.label_smoothing)
    if config.train_sampling_strategy == "random":
        config.train_sampling_strategy = "group_by_length"
    write_recipe(out, model_args, config)
    trainer = MCTSDPOTrainer(model=model, ref_model=ref, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config(model_args))
    result, checkpoint = train_and_save(trainer, out, tokenizer, config.resume_from_checkpoint)
    metrics = dict(run_metrics(trainer, result, checkpoint), **report, policy=policy, reference=config.ref_model_path,
                   label_smoothing_mean=sum(dataset["label_smoothing"]) / len(dataset),
                   history=[{k: v for k, v in h.items() if k in ("step", "loss", "rewards/accuracies", "rewards/margins",
                                                               "logps/chosen", "logps/rejected", "label_smoothing")}
                            for h in trainer.state.log_history if "loss" in h])
    if trainer.accelerator.is_main_process:
        write_metrics(out, metrics)
    return metrics
