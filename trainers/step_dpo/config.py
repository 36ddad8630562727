"""Step-DPO's recipe: TRL's `DPOConfig` with the prompt budget Step-DPO truncates to, and which pairs
to train on; the model and LoRA fields come from TRL's `ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig


@dataclass
class StepDPOConfig(DPOConfig):
    """TRL's `DPOConfig` plus the prompt budget Step-DPO truncates to."""

    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Prompts longer than this lose their start (the step is never cut)."})


@dataclass
class StepDPOScriptArguments:
    """Which pairs to train on and how to render their prompts; model fields come from TRL's ModelConfig."""

    pairs: str = field(default="", metadata={"help": "Pair JSONL (launch/step_dpo_data.py) or a hub dataset, e.g. xinlai/Math-Step-DPO-10K."})
    pairs_split: str = field(default="train", metadata={"help": "Split of a hub pair dataset (a JSONL file has one)."})
    num_pairs: int | None = field(default=None, metadata={"help": "Use only the first N pairs."})
    prompt_style: str | None = field(default=None, metadata={
        "help": "bare | plain | chat | qwen2-boxed | alpaca | deepseek-math; default: bare for the tiny "
                "policy, chat when the tokenizer has a template, else plain."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Report malformed pair rows and go on, instead of stopping."})
