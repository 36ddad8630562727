"""`launch/train_prm.py`: train a discriminative PRM on stepwise records.

    accelerate launch launch/train_prm.py --config configs/train_prm/arith.yaml [--field value ...]

Data: a JSONL of TRL-style records {prompt, completions, labels} (or Math-Shepherd / PRM800K rows
with `--data_format`). The backbone is any causal-LM checkpoint (the tiny policy by default); its
LM head is replaced by a fresh two-class token head. LoRA through peft with `--use_lora true`.
With `--likelihood_fusion true` a share of the records (`--fusion_holdout`) is kept out of the
head's training and used to fit the fusion of the head with the backbone LM's likelihood of each
step (`treetune.rewards.scorers.fusion`, written as fusion.json next to the model).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treetune.data.arith import tiny_policy
from treetune.rewards.labels.formats import read_stepwise
from treetune.rewards.scorers import fusion as prm_fusion
from treetune.rewards.scorers.discriminative import DiscriminativePRM
from treetune.trainers.common import parse_recipe
from treetune.trainers.prm.trainer import PRMCollator, PRMTrainer, tokenize_stepwise

log = logging.getLogger(__name__)


@dataclass
class PRMScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Backbone; empty: the arith tiny policy."})
    train_file: str = field(default="", metadata={"help": "Stepwise JSONL records."})
    data_format: str = "trl"  # trl | math_shepherd | prm800k
    separator: str = "\n"
    soft_labels: bool = False
    max_length: int = 512
    use_lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    likelihood_fusion: bool = False
    fusion_holdout: float = 0.1
    fusion_features: str = "head_logit,step_min_logp,step_mean_logp,prefix_min_logp"


def split_holdout(records: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(records for the head, records held out for the fusion fit), a seeded shuffle."""
    import random

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


def run(args: PRMScriptArguments, training_args) -> Path:
    from datasets import Dataset
    from transformers import AutoModelForTokenClassification, AutoTokenizer, set_seed



    set_seed(training_args.seed)
    if not args.train_file:
        raise ValueError("--train_file is required (stepwise JSONL records)")
    backbone = args.model_name_or_path
    if not backbone:

        backbone = tiny_policy()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    records = read_stepwise(args.train_file, args.data_format)
    held_out: list[dict] = []
    if args.likelihood_fusion:
        records, held_out = split_holdout(records, args.fusion_holdout, training_args.seed)
    rows = [tokenize_stepwise(r, tokenizer, args.separator, args.max_length) for r in records]
    model = AutoModelForTokenClassification.from_pretrained(backbone, num_labels=2)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if args.use_lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.TOKEN_CLS, r=args.lora_r, lora_alpha=args.lora_alpha,
                                                 lora_dropout=args.lora_dropout))
    trainer = PRMTrainer(model=model, args=training_args, train_dataset=Dataset.from_list(rows),
                         data_collator=PRMCollator(model.config.pad_token_id), soft_labels=args.soft_labels)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    out = Path(training_args.output_dir)
    if args.use_lora:
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model(str(out))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(out))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        metrics = dict(result.metrics, records=len(records), losses=losses)
        if args.likelihood_fusion:
            # training is over: load the models for the fit whole, not as ZeRO-3 partitions of
            # ranks that have already left
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            fusion = fit_fusion(out, backbone, held_out, args.separator, args.max_length,
                                [f.strip() for f in args.fusion_features.split(",") if f.strip()])
            metrics.update(fusion_records=len(held_out), fusion=fusion)
        (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "recipe.json").write_text(json.dumps({"script": asdict(args), "training": training_args.to_dict()}, indent=2, default=str))
    return out


def main(argv: list[str] | None = None) -> Path:
    from transformers import TrainingArguments


    logging.basicConfig(level=os.environ.get("TREETUNE_LOG", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    script_args, training_args = parse_recipe((PRMScriptArguments, TrainingArguments), argv)
    training_args.remove_unused_columns = False
    return run(script_args, training_args)


if __name__ == "__main__":
    main()
