"""The PRM trainer's recipe: the records, the step separator, the loss, and the likelihood fusion.

The backbone and LoRA fields come from TRL's `ModelConfig` (`--use_peft`, `--lora_r`, ...), the
training fields from transformers' `TrainingArguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Field names of earlier releases, accepted with a FutureWarning (old -> new).
RENAMED = {"use_lora": "use_peft"}


@dataclass
class PRMScriptArguments:
    """What the PRM trains on and how its labels are read; the backbone comes from TRL's ModelConfig
    (`model_name_or_path`; empty: the arith tiny policy)."""

    train_file: str = field(default="", metadata={
        "help": "Stepwise JSONL records (launch/prm_labels.py writes labels.jsonl in this layout)."})
    data_format: str = field(default="trl", metadata={
        "help": "Layout of train_file: trl ({prompt, completions, labels}), math_shepherd or prm800k."})
    separator: str = field(default="\n", metadata={
        "help": "Appended to every step; the step's label sits on its last token (use the policy's step delimiter)."})
    soft_labels: bool = field(default=False, metadata={
        "help": "Train on float labels in [0, 1] (e.g. Monte Carlo estimates) with binary cross-entropy; "
                "off: labels are hard (> 0.5 is correct) with cross-entropy."})
    max_length: int = field(default=512, metadata={"help": "Records longer than this (in tokens) are cut at the end."})
    likelihood_fusion: bool = field(default=False, metadata={
        "help": "Fit a fusion of the head with the backbone LM's step likelihood on held-out records "
                "(written as fusion.json next to the model)."})
    fusion_holdout: float = field(default=0.1, metadata={
        "help": "Share of the records held out of the head's training for the fusion fit."})
    fusion_features: str = field(default="head_logit,step_min_logp,step_mean_logp,prefix_min_logp", metadata={
        "help": "Comma-separated features the fusion combines (see treetune.rewards.scorers.fusion.FEATURES)."})
