"""Training a discriminative process reward model (TRL 1.16 no longer ships a PRM trainer).

    accelerate launch launch/train_prm.py --config configs/train_prm/arith.yaml [--field value ...]

A PRM here is a backbone with a two-class token head (`AutoModelForTokenClassification`,
num_labels=2) read at the step separator: the TRL convention. The prompt's tokens come first,
then each step followed by the separator; the step's label sits on the separator's last token,
every other position is ignored (-100). Hard labels (bool) train with cross-entropy; soft labels
(floats in [0, 1], e.g. Monte Carlo estimates) with binary cross-entropy on
P(correct) = softmax(logits)[1], since casting them to int (as TRL's trainer did) would throw the
estimate away.

Data: a JSONL of TRL-style records {prompt, completions, labels} (or Math-Shepherd / PRM800K rows
with `--data_format`). The backbone is any causal-LM checkpoint (the tiny policy by default); its
LM head is replaced by a fresh two-class token head. LoRA through peft with `--use_peft true` (TRL's
`ModelConfig` fields). With `--likelihood_fusion true` a share of the records (`--fusion_holdout`)
is kept out of the head's training and used to fit the fusion of the head with the backbone LM's
likelihood of each step (`treetune.trainers.prm.fusion`, written as fusion.json next to the model).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import Trainer
from treetune.rewards.labels.formats import read_stepwise
from treetune.rewards.scorers.discriminative import IGNORE, PRMCollator, tokenize_stepwise  # noqa: F401 (re-exported)
from treetune.trainers.common import (
    load_policy,
    parse_recipe,
    peft_config,
    run_metrics,
    setup_logging,
    train_and_save,
    write_metrics,
    write_recipe,
)
from treetune.trainers.prm.config import RENAMED, PRMScriptArguments
from treetune.trainers.prm.fusion import fit_fusion, split_holdout

log = logging.getLogger(__name__)


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


def run(args: PRMScriptArguments, training_args, model_args) -> Path:
    """Train the PRM, save it (vLLM- and `from_pretrained`-loadable: LoRA merged, ZeRO-3 weights
    gathered), fit the fusion if asked, and write `recipe.json` and `metrics.json` to output_dir."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForTokenClassification, set_seed

    set_seed(training_args.seed)
    if not args.train_file:
        raise ValueError("--train_file is required (stepwise JSONL records; launch/prm_labels.py writes them)")
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_stepwise(args.train_file, args.data_format)
    held_out: list[dict] = []
    if args.likelihood_fusion:
        records, held_out = split_holdout(records, args.fusion_holdout, training_args.seed)
    backbone, tokenizer, model = load_policy(model_args, model_class=AutoModelForTokenClassification, num_labels=2)
    rows = [tokenize_stepwise(r, tokenizer, args.separator, args.max_length) for r in records]
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    lora = peft_config(model_args, task_type="TOKEN_CLS")
    if lora is not None:  # the fresh head is trained whole beside the adapter (peft keeps it in modules_to_save)
        model = get_peft_model(model, lora)
    write_recipe(out, args, model_args, training_args)
    trainer = PRMTrainer(model=model, args=training_args, train_dataset=Dataset.from_list(rows),
                         data_collator=PRMCollator(model.config.pad_token_id), soft_labels=args.soft_labels)
    result, checkpoint = train_and_save(trainer, out, tokenizer, training_args.resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        metrics = dict(run_metrics(trainer, result, checkpoint), backbone=backbone, records=len(records))
        if args.likelihood_fusion:
            # training is over: load the models for the fit whole, not as ZeRO-3 partitions of
            # ranks that have already left
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            fusion = fit_fusion(out, backbone, held_out, args.separator, args.max_length,
                                [f.strip() for f in args.fusion_features.split(",") if f.strip()])
            metrics.update(fusion_records=len(held_out), fusion=fusion)
        write_metrics(out, metrics)
    return out


def main(argv: list[str] | None = None) -> Path:
    from transformers import TrainingArguments
    from trl import ModelConfig

    setup_logging()
    script_args, training_args, model_args = parse_recipe((PRMScriptArguments, TrainingArguments, ModelConfig), argv,
                                                          RENAMED)
    training_args.remove_unused_columns = False
    return run(script_args, training_args, model_args)


if __name__ == "__main__":
    main()
