"""BVPO's recipe: TRL's `DPOConfig` plus the mixing weight of the two estimators and how `auto`
estimates it, and which pairs to train on; the model and LoRA fields come from TRL's `ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig


def parse_alpha(value: str | float) -> float | None:
    """A fixed alpha in [0, 1], or None for `auto`."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"bvpo_alpha must be a number in [0, 1] or 'auto', got {value!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"bvpo_alpha must lie in [0, 1], got {alpha}")
    return alpha


@dataclass
class BVPOConfig(DPOConfig):
    """TRL's `DPOConfig` plus BVPO's mixing weight and how `auto` estimates it."""

    bvpo_alpha: str = field(default="0.5", metadata={
        "help": "Weight a of the trace loss in a*L_trace + (1-a)*L_empty: a number in [0, 1], or 'auto' "
                "(closed-form MSE-optimal a from the two estimators' gradient statistics)."})
    bvpo_alpha_window: int = field(default=32, metadata={"help": "auto: measured micro-batches whose gradients the estimate uses."})
    bvpo_alpha_min_samples: int = field(default=4, metadata={"help": "auto: measurements at 0.5 before the first estimate."})
    bvpo_alpha_every: int = field(default=1, metadata={
        "help": "auto: measure the two gradients every N micro-batches (each measurement costs two extra backward passes)."})
    bvpo_sketch_dim: int | None = field(default=65536, metadata={
        "help": "auto: gradient coordinates sampled for the statistics (None or 0: all of them)."})
    max_prompt_length: int | None = field(default=512, metadata={"help": "Prompts longer than this lose their start."})

    def __post_init__(self):
        super().__post_init__()
        parse_alpha(self.bvpo_alpha)  # fail at parse time, not after loading a model


@dataclass
class BVPOScriptArguments:
    """Which pairs to train on and how to render their prompts; model fields come from TRL's ModelConfig."""

    pairs: str = field(default="", metadata={"help": "Pair JSONL with a `mode` field per row (launch/bvpo_data.py), or a hub dataset."})
    trace_pairs: str = field(default="", metadata={"help": "Or: a file / hub dataset of trace pairs only."})
    empty_pairs: str = field(default="", metadata={"help": "And: a file / hub dataset of empty-trace pairs only."})
    pairs_split: str = field(default="train", metadata={"help": "Split of a hub pair dataset (a JSONL file has one)."})
    num_pairs: int | None = field(default=None, metadata={"help": "Use only the first N trace pairs."})
    prompt_style: str | None = field(default=None, metadata={
        "help": "bare | plain | chat; default: bare for the tiny policy, chat when the tokenizer has a template, else plain."})
    think_block: str | None = field(default=None, metadata={
        "help": "The empty think block appended in empty mode; default: the chat template's enable_thinking=False "
                "rendering where it has one, else '<think>\\n\\n</think>\\n\\n' (unverified against the paper)."})
    skip_bad_rows: bool = field(default=False, metadata={"help": "Report malformed pair rows and go on, instead of stopping."})
