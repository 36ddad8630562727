"""The SFT recipe's own fields: what to train on and, with no model given, the tiny model to build.

The problem selection is the shared `treetune.data.ProblemArgs` (source, split, data_path, limit,
problem_seed) with SFT's defaults; the model, its revision, dtype and LoRA come from TRL's
`ModelConfig`; every TRL `SFTConfig` field is a flag beside these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from treetune.data import ProblemArgs
from treetune.data.sources import SOURCES

# Field names of earlier releases, accepted with a FutureWarning (old -> new).
RENAMED = {
    "dataset_source": "source",
    "dataset_split": "split",
    "dataset_path": "data_path",
    "num_train_examples": "limit",
    "data_seed_offset": "problem_seed",
}


@dataclass
class SFTScriptArguments(ProblemArgs):
    """What to train on and how to render it; with no `model_name_or_path`, the model to build."""

    source: str = field(default="arith", metadata={
        "help": "Problem source (" + ", ".join(SOURCES) + ") whose gold solutions are the completions, or "
                "records: a JSONL of prompt/completion rows at data_path."})
    split: str = field(default="train", metadata={"help": "Split to train on: train, test (or validation for arith)."})
    prompt_style: str = field(default="plain", metadata={"help": "plain, chat or bare (see treetune.data.prompts)."})
    stop_at_accuracy: float | None = field(default=None, metadata={
        "help": "Stop once greedy accuracy on held-out problems reaches this share; empty: train to the end."})
    accuracy_eval_every: int = field(default=25, metadata={"help": "Steps between two held-out accuracy checks."})
    accuracy_eval_problems: int = field(default=200, metadata={"help": "Held-out problems decoded at each check."})
    accuracy_eval_split: str = field(default="validation", metadata={
        "help": "Split of the same source the held-out problems come from (never the test split)."})
    # Building a model from scratch (only when model_name_or_path is empty).
    tokenizer_vocab_size: int = field(default=512, metadata={
        "help": "From scratch: BPE vocabulary size of the tokenizer trained on the training texts."})
    tokenizer_corpus_size: int = field(default=5000, metadata={
        "help": "From scratch: how many training texts the tokenizer is trained on."})
    hidden_size: int = field(default=128, metadata={"help": "From scratch: the Qwen2 model's hidden size."})
    intermediate_size: int = field(default=384, metadata={"help": "From scratch: the MLP's inner size."})
    num_hidden_layers: int = field(default=4, metadata={"help": "From scratch: transformer layers."})
    num_attention_heads: int = field(default=4, metadata={
        "help": "From scratch: attention heads (hidden_size / heads must be >= 32 for vLLM's CPU kernels)."})
    num_key_value_heads: int = field(default=2, metadata={"help": "From scratch: key/value heads (grouped-query attention)."})
    max_position_embeddings: int = field(default=256, metadata={"help": "From scratch: the longest sequence the model takes."})
