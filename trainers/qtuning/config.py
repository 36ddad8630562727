"""Q-Tuning's recipe: TRL's `SFTConfig` plus the sample and token budgets of its pruning.

The data fields are the SFT recipe's (`treetune.trainers.sft.config.SFTScriptArguments`), the model
and LoRA fields TRL's `ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig


@dataclass
class QTuningConfig(SFTConfig):
    """TRL's `SFTConfig` plus Q-Tuning's budgets."""

    sample_ratio: float = field(default=0.25, metadata={"help": "Share of each mini-batch's samples kept (Q2 + Q4, topped up)."})
    token_ratio: float = field(default=0.5, metadata={"help": "Share of answer tokens kept in misconception (high-PPL) samples."})
    token_smoothing: float = field(default=0.5, metadata={"help": "lambda of the neighbour-smoothed token score."})
    bisection_iterations: int = field(default=10, metadata={"help": "Bisection steps for the quantile share alpha (= beta)."})
    pruning: str = field(default="qtuning", metadata={
        "help": "qtuning, or random: the paper's random-samples x random-tokens baseline at the same budgets."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("sample_ratio", "token_ratio"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not 0.0 <= self.token_smoothing <= 1.0:
            raise ValueError(f"token_smoothing must be in [0, 1], got {self.token_smoothing}")
        if self.bisection_iterations < 1:
            raise ValueError(f"bisection_iterations must be at least 1, got {self.bisection_iterations}")
        if self.pruning not in ("qtuning", "random"):
            raise ValueError(f"pruning must be 'qtuning' or 'random', got {self.pruning!r}")
        if self.packing or self.padding_free:
            raise ValueError("Q-Tuning selects whole samples of a padded batch: packing and padding_free must be off")
