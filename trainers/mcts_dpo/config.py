"""MCTS-DPO's training recipe: Step-DPO's config plus the per-pair smoothing and the fixed reference.

The loop's own fields (rounds, search, pairs, evaluation) are `MCTSDPOArgs` in
`treetune.trainers.mcts_dpo.loop`; the model and LoRA fields come from TRL's `ModelConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from treetune.trainers.step_dpo.config import StepDPOConfig


@dataclass
class MCTSDPOConfig(StepDPOConfig):
    """Step-DPO's config plus MCTS-DPO's per-pair smoothing and its fixed reference model."""

    conservative: bool = field(default=True, metadata={
        "help": "cDPO with each pair's visit-count label smoothing; off: the global label_smoothing for every pair."})
    ref_model_path: str | None = field(default=None, metadata={
        "help": "The reference model (MCTS-DPO: the starting policy, fixed over all rounds); empty: the policy itself."})
