"""Online RL's recipe: TRL's `GRPOConfig` plus how rollouts grow as trees and how advantages are
read from them; the job's own fields (problems, engine, evaluation, extra rewards) are
`TreePOScriptArguments`; model and LoRA fields come from TRL's `ModelConfig`.

`--sampler flat --advantage grpo` is plain GRPO (one flat tree of G samples per prompt, TRL's
group baseline); `--sampler treepo --advantage subgroup` is TreePO (segment trees, subgroup
advantages whitened over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from treetune.data.sources import ProblemArgs
from treetune.rollouts.run import redefault
from treetune.rollouts.scoring import ScorerArgs
from trl import GRPOConfig

SAMPLERS = ("flat", "treepo")
ADVANTAGES = ("grpo", "subgroup", "segment")
WHITENING = ("token", "trajectory", "none")


@dataclass
class TreePOConfig(GRPOConfig):
    """TRL's `GRPOConfig` (loss, clipping, KL, batch sizes, vLLM importance-sampling correction, ...)
    plus the tree sampler and the tree advantages. `num_generations` (G) is the number of finished
    leaves of every tree; `max_completion_length` caps a root-to-leaf path; `temperature` and
    `top_p` are the rollout's sampling settings."""

    sampler: str = field(default="treepo", metadata={
        "help": "How a prompt's G completions grow: flat (G independent samples, GRPO) or treepo (a segment tree "
                "with G finished leaves sharing prefixes)."})
    advantage: str = field(default="subgroup", metadata={
        "help": "grpo (TRL's group baseline), subgroup (TreePO: reward minus the mean of the leaves sharing each "
                "ancestor, averaged over depths, whitened over the batch) or segment (per token: V(node) - V(parent))."})
    whiten: str = field(default="token", metadata={
        "help": "subgroup / segment: whiten over the whole batch (all ranks) by token (TreePO's masked whitening), "
                "by trajectory, or none."})
    mask_zero_variance_trees: bool = field(default=False, metadata={
        "help": "Leave trees whose leaves all got the same reward out of the loss and its token count (DAPO's "
                "dynamic-sampling effect, without resampling)."})
    fork: str = field(default="fixed", metadata={
        "help": "treepo: fixed (fork every segment, the paper) or coupled (fork where independent samples would "
                "part, so the leaves stay iid)."})
    segment_tokens: int = field(default=16, metadata={"help": "treepo: tokens per segment (a tree node)."})
    max_depth: int = field(default=16, metadata={"help": "treepo: segments per path at most."})
    branch: int = field(default=2, metadata={"help": "treepo: children of a live path per step, at most."})
    init_divergence: int = field(default=2, metadata={"help": "treepo: children of the root."})
    init_divergence_max: int | None = field(default=None, metadata={
        "help": "treepo: if set, the root gets a random number of children in [init_divergence, this]."})
    budget: str = field(default="even", metadata={
        "help": "treepo: how live paths share the branching budget: even, or logprob (softmax of mean log-probs)."})
    fallback: bool = field(default=True, metadata={
        "help": "treepo: re-fork a finished path when no path is live and fewer than G have finished (keeps G)."})
    stop_on_boxed: bool = field(default=False, metadata={
        "help": "treepo: end a path at its first boxed answer. Off by default: a path then ends at EOS, so the "
                "policy learns to stop (TreePO's boxed_and_eos_first)."})
    coupled_top_k: int = field(default=8, metadata={"help": "treepo, fork=coupled: top log-probs read per position."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (("sampler", self.sampler, SAMPLERS), ("advantage", self.advantage, ADVANTAGES),
                                     ("whiten", self.whiten, WHITENING), ("fork", self.fork, ("fixed", "coupled")),
                                     ("budget", self.budget, ("even", "logprob"))):
            if value not in allowed:
                raise ValueError(f"field '{name}': {value!r} is not one of {', '.join(allowed)}")
        local = self.per_device_train_batch_size * self.steps_per_generation
        if local % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size x steps_per_generation = {local} rows per rank and generation must be a "
                f"multiple of num_generations = {self.num_generations}, so that no tree is split across ranks")


@dataclass
class TreePOScriptArguments(ScorerArgs, ProblemArgs):
    """The job around the trainer: training problems, the rollout engine, evaluation, extra rewards."""

    split: str = redefault(ProblemArgs, "split", "train")
    engine: str = field(default="vllm", metadata={
        "help": "Rollout engine: vllm (in-process vLLM on this rank, weights loaded in place every step), servers "
                "(a pool of `vllm serve` URLs, --server_urls, that reload the weights from --sync_dir) or hf."})
    server_urls: str | None = field(default=None, metadata={"help": "Comma-separated `vllm serve` URLs, for --engine servers."})
    sync_dir: str | None = field(default=None, metadata={
        "help": "--engine servers: a folder every server can read (shared storage across nodes) where each step's "
                "weights are written; empty: a tmpfs folder on this machine."})
    kv_cache_gb: float | None = field(default=None, metadata={"help": "KV-cache size in GB of the in-process vLLM engine."})
    prompt_style: str | None = field(default=None, metadata={
        "help": "bare | plain | chat | ...; default: bare for the tiny policy, chat when the tokenizer has a template."})
    scorer_weight: float = field(default=1.0, metadata={
        "help": "Weight of the --scorer reward (its step scores aggregated by --scorer_aggregation) beside the "
                "outcome reward (weight 1)."})
    scorer_aggregation: str = field(default="min", metadata={"help": "last | min | product | mean of the step scores."})
    overlong_buffer: int | None = field(default=None, metadata={
        "help": "TRL's soft overlong penalty: the last N tokens before max_completion_length cost up to 1; empty: off."})
    eval_source: str | None = field(default=None, metadata={"help": "Evaluation problems' source; empty: --source."})
    eval_split: str = field(default="test", metadata={"help": "Evaluation split."})
    eval_data_path: str | None = field(default=None, metadata={"help": "A local evaluation file; empty: the hub (or arith)."})
    eval_problems: int = field(default=500, metadata={
        "help": "Greedy accuracy on this many evaluation problems before and after training; 0: no evaluation."})
    eval_max_tokens: int | None = field(default=None, metadata={"help": "Tokens of a greedy answer; empty: max_completion_length."})
