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

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treetune.data.arith import tiny_policy
from treetune.data.step_pairs import dpo_prompt, load_step_pairs
from treetune.rollouts.run import default_prompt_style
from treetune.trainers.common import parse_recipe
from treetune.trainers.distributed import save_final_model
from trl import DPOConfig, DPOTrainer

log = logging.getLogger(__name__)


@dataclass
class StepDPOConfig(DPOConfig):
    """TRL's `DPOConfig` plus the prompt budget Step-DPO truncates to."""

    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Prompts longer than this lose their start (the step is never cut)."})


@dataclass
class StepDPOScriptArguments:
    """Which pairs to train on and how to render their prompts; model fields come from TRL's ModelConfig."""

    pairs: str = field(default="", metadata={"help": "Pair JSONL (launch/step_dpo_data.py) or a hub dataset, e.g. xinlai/Math-Step-DPO-10K."})
    pairs_split: str = "train"
    num_pairs: int | None = field(default=None, metadata={"help": "Use only the first N pairs."})
    prompt_style: str | None = field(default=None, metadata={
        "help": "bare | plain | chat | qwen2-boxed | alpaca | deepseek-math; default: bare for the tiny "
                "policy, chat when the tokenizer has a template, else plain."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Report malformed pair rows and go on, instead of stopping."})


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


def load_policy(model_args):
    """Tokenizer and causal LM named by TRL's ModelConfig; no name means the arith tiny policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    path = model_args.model_name_or_path or tiny_policy()
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, revision=model_args.model_revision, dtype=model_args.dtype or "auto",
                                                 attn_implementation=model_args.attn_implementation)
    return path, tokenizer, model


def resume_point(config) -> str | bool | None:
    """`resume_from_checkpoint`: a path, or `auto` / `true` for the newest checkpoint in output_dir."""
    from transformers.trainer_utils import get_last_checkpoint

    wanted = config.resume_from_checkpoint
    if isinstance(wanted, str) and wanted.lower() in ("auto", "true", "last"):
        last = get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
        return last  # None: nothing to resume, start fresh
    return wanted


def run_step_dpo(script_args: StepDPOScriptArguments, config: StepDPOConfig, model_args) -> Path:
    """Train on the pairs, save the final model (vLLM-loadable) and `metrics.json` to output_dir."""
    from transformers import set_seed
    from trl import get_peft_config



    set_seed(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not script_args.pairs:
        raise ValueError("--pairs is required: a pair JSONL from launch/step_dpo_data.py or a hub dataset name")
    pairs, report = load_step_pairs(script_args.pairs, script_args.pairs_split, skip_bad=script_args.skip_bad_rows,
                                    limit=script_args.num_pairs)
    if len(report):
        log.warning(report.summary())
    path, tokenizer, model = load_policy(model_args)
    style = default_prompt_style(script_args.prompt_style, bool(model_args.model_name_or_path), tokenizer)
    dataset, tokenize_report = build_step_dataset(pairs, tokenizer, style, config.max_length, config.max_prompt_length)
    if config.train_sampling_strategy == "random":
        config.train_sampling_strategy = "group_by_length"
    (out / "recipe.json").write_text(json.dumps({"script": asdict(script_args), "model": asdict(model_args),
                                                 "training": config.to_dict(), "policy": path, "prompt_style": style},
                                                indent=2, default=str))
    trainer = StepDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=get_peft_config(model_args))
    result = trainer.train(resume_from_checkpoint=resume_point(config))
    save_final_model(trainer, out, tokenizer)  # vLLM-loadable: LoRA merged, ZeRO-3 weights gathered
    if trainer.accelerator.is_main_process:
        metrics = dict(result.metrics, steps=trainer.state.global_step, prompt_style=style,
                       padding_share=trainer.padding_meter.padding_share, real_tokens=trainer.padding_meter.real,
                       pair_tokens_per_second=trainer.padding_meter.real / max(result.metrics["train_runtime"], 1e-9),
                       skipped_rows=len(report),
                       skipped=[str(e) for e in report.skipped[:20]], **tokenize_report,
                       world_size=trainer.accelerator.num_processes,
                       loss_history=[h["loss"] for h in trainer.state.log_history if "loss" in h])
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out


def main(argv: list[str] | None = None) -> Path:
    from trl import ModelConfig


    logging.basicConfig(level=os.environ.get("TREETUNE_LOG", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    script_args, config, model_args = parse_recipe((StepDPOScriptArguments, StepDPOConfig, ModelConfig), argv)
    return run_step_dpo(script_args, config, model_args)
