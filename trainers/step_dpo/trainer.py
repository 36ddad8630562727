"""Step-DPO: DPO on step-wise preference pairs (Lai et al. 2024), a thin `trl.DPOTrainer` subclass.

The prompt is the problem plus the correct reasoning prefix; chosen and rejected are one step
each, so the loss covers the step tokens only. Differences from TRL's own preparation, each
deliberate:
- no EOS is appended to a step: a step is not the end of a solution (Step-DPO's "fixeos");
- the step is tokenised on its own and appended to the prompt's tokens, which is how the policy
  produced it (a continuation of the prompt's token ids), rather than re-tokenising prompt + step;
- a pair too long for `max_length` loses the start of its prompt (the problem text), never the
  contested step, as Step-DPO truncates; rows that cannot fit at all are counted and reported;
- pairs are batched by length (`train_sampling_strategy="group_by_length"`), since step pairs
  are short and prompts vary, and the trainer logs the share of padding and the pair tokens per
  second it actually saw.
The loss is TRL's (sigmoid by default): Step-DPO changes the data, not the objective.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from treetune.data.step_pairs import dpo_prompt, load_step_pairs
from treetune.rollouts.run import default_prompt_style
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
from treetune.trainers.step_dpo.config import StepDPOConfig, StepDPOScriptArguments
from trl import DPOTrainer

log = logging.getLogger(__name__)


def tokenize_step_pair(prompt: str, chosen: str, rejected: str, tokenizer, max_length: int | None,
                       max_prompt_length: int | None, add_special_tokens: bool = True) -> dict | None:
    """Token ids of one step pair, no EOS; None when not even one prompt token fits beside the steps."""
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    chosen_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"]
    longer = max(len(chosen_ids), len(rejected_ids))
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    if max_length is not None and len(prompt_ids) + longer > max_length:
        room = max_length - longer
        if room < 1:
            return None
        prompt_ids, truncated = prompt_ids[-room:], True
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
            "length": len(prompt_ids) + longer, "prompt_truncated": truncated}


class PaddingMeter:
    """Wraps a collator to count real and padded tokens of every batch it builds."""

    def __init__(self, collator):
        self.collator, self.real, self.total = collator, 0, 0

    def __call__(self, examples):
        batch = self.collator(examples)
        mask = batch["attention_mask"]
        self.real += int(mask.sum())
        self.total += mask.numel()
        return batch

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real / self.total if self.total else 0.0


class StepDPOTrainer(DPOTrainer):
    """`DPOTrainer` fed pre-tokenised step pairs (see `tokenize_step_pair`); every TRL and
    transformers option (LoRA, DeepSpeed, gradient checkpointing, report_to, resume) is unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = self.padding_meter = PaddingMeter(self.data_collator)
        self._started = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names:
            raise ValueError(f"{dataset_name}: StepDPOTrainer takes pairs tokenised by tokenize_step_pair "
                             "(prompt_ids, chosen_ids, rejected_ids); use build_step_dataset")
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "length" not in self._signature_columns:  # the length-grouped sampler reads it
            self._signature_columns = list(self._signature_columns) + ["length"]

    def training_step(self, *args, **kwargs):
        if self._started is None:
            self._started = time.perf_counter()
        return super().training_step(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.padding_meter.total:
            logs["padding_share"] = round(self.padding_meter.padding_share, 4)
            if self._started is not None:
                logs["pair_tokens_per_second"] = round(self.padding_meter.real / (time.perf_counter() - self._started), 1)
        super().log(logs, start_time)


def build_step_dataset(pairs, tokenizer, style: str, max_length: int | None, max_prompt_length: int | None):
    """A `datasets.Dataset` of tokenised pairs and a report of what truncation did."""
    from datasets import Dataset


    rows, dropped, truncated = [], [], 0
    for index, pair in enumerate(pairs):
        row = tokenize_step_pair(dpo_prompt(pair, style, tokenizer), pair.chosen, pair.rejected, tokenizer,
                                 max_length, max_prompt_length, add_special_tokens=style != "chat")
        if row is None:
            dropped.append(pair.problem_id or f"pair {index + 1}")
            continue
        truncated += row.pop("prompt_truncated")
        rows.append(row)
    if dropped:
        log.warning("%d pair(s) have a step longer than max_length=%s and were left out, e.g. %s",
                    len(dropped), max_length, dropped[:5])
    if not rows:
        raise ValueError("no step pair fits max_length; raise --max_length")
    return Dataset.from_list(rows), {"pairs": len(rows), "prompt_truncated": truncated, "too_long": len(dropped),
                                     "too_long_examples": dropped[:20]}


def run_step_dpo(script_args: StepDPOScriptArguments, config: StepDPOConfig, model_args) -> Path:
    """Train on the pairs, save the final model (vLLM-loadable), `recipe.json` and `metrics.json` to output_dir."""
    from transformers import set_seed

    set_seed(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not script_args.pairs:
        raise ValueError("--pairs is required: a pair JSONL from launch/step_dpo_data.py or a hub dataset name")
    pairs, report = load_step_pairs(script_args.pairs, script_args.pairs_split, skip_bad=script_args.skip_bad_rows,
                                    limit=script_args.num_pairs)
    if len(report):
        log.warning(report.summary())
    if not pairs:  # before loading a model: an empty pair file is no length problem
        raise ValueError(f"{script_args.pairs}: no step pairs to train on")
    path, tokenizer, model = load_policy(model_args)
    style = default_prompt_style(script_args.prompt_style, bool(model_args.model_name_or_path), tokenizer)
    dataset, tokenize_report = build_step_dataset(pairs, tokenizer, style, config.max_length, config.max_prompt_length)
    if config.train_sampling_strategy == "random":
        config.train_sampling_strategy = "group_by_length"
    write_recipe(out, script_args, model_args, config)
    trainer = StepDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config(model_args))
    result, checkpoint = train_and_save(trainer, out, tokenizer, config.resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        metrics = dict(run_metrics(trainer, result, checkpoint), policy=path, prompt_style=style,
                       padding_share=trainer.padding_meter.padding_share, real_tokens=trainer.padding_meter.real,
                       pair_tokens_per_second=trainer.padding_meter.real / max(result.metrics["train_runtime"], 1e-9),
                       skipped_rows=len(report), skipped=[str(e) for e in report.skipped[:20]], **tokenize_report)
        write_metrics(out, metrics)
    return out


def main(argv: list[str] | None = None) -> Path:
    from trl import ModelConfig

    setup_logging()
    script_args, config, model_args = parse_recipe((StepDPOScriptArguments, StepDPOConfig, ModelConfig), argv)
    return run_step_dpo(script_args, config, model_args)


if __name__ == "__main__":
    main()
