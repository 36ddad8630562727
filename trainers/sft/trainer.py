"""Supervised fine-tuning on problems with worked solutions (TRL's SFTTrainer underneath).

One recipe serves two cases:
- `model_name_or_path` names a hub model or a local checkpoint: it is fine-tuned as it is;
- `model_name_or_path` is empty: a tokenizer is trained on the training texts and a small
  Qwen2-architecture model is built from scratch (how the arith tiny policy is made).

Training records are prompt/completion pairs: the prompt is the problem rendered by a prompt
template, the completion its gold solution, so the loss covers the solution tokens only.
Run it as `accelerate launch launch/sft.py --config configs/sft/arith.yaml [--field value ...]`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treetune.data import PromptTemplate, load_problems
from treetune.data.records import read_records, require
from treetune.trainers.common import parse_recipe
from treetune.trainers.sft.accuracy_stop import StopAtAccuracy

log = logging.getLogger(__name__)


@dataclass
class SFTScriptArguments:
    """What to train and on what; every TRL `SFTConfig` field is available beside these."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub name or local path; empty builds a tiny model from scratch."})
    dataset_source: str = field(default="arith", metadata={"help": "arith, gsm8k, math, math500, jsonl (problems), or records (prompt/completion JSONL)."})
    dataset_path: str | None = field(default=None, metadata={"help": "Local file for the dataset source."})
    dataset_split: str = "train"
    num_train_examples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})
    prompt_style: str = field(default="plain", metadata={"help": "plain, chat or bare (see treetune.data.prompts)."})
    data_seed_offset: int = field(default=0, metadata={"help": "Generator seed of the arith source."})
    stop_at_accuracy: float | None = field(default=None, metadata={"help": "Stop once greedy accuracy on held-out problems reaches this."})
    accuracy_eval_every: int = 25
    accuracy_eval_problems: int = 200
    accuracy_eval_split: str = "validation"
    # Building a model from scratch (only when model_name_or_path is empty).
    tokenizer_vocab_size: int = 512
    tokenizer_corpus_size: int = 5000
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


def training_records(args: SFTScriptArguments, tokenizer=None) -> list[dict[str, str]]:
    """The prompt/completion records the recipe trains on."""

    if args.dataset_source == "records":
        if not args.dataset_path:
            raise ValueError("dataset_source 'records' needs dataset_path (a JSONL of prompt/completion)")
        rows, _ = read_records(
            args.dataset_path,
            lambda r, line: {"prompt": require(r, "prompt", args.dataset_path, line), "completion": require(r, "completion", args.dataset_path, line)},
            limit=args.num_train_examples,
        )
        return rows
    problems = load_problems(args.dataset_source, args.dataset_split, path=args.dataset_path,
                             limit=args.num_train_examples, seed=args.data_seed_offset)
    template = PromptTemplate(style=args.prompt_style)
    missing = [p.id for p in problems if not p.solution]
    if missing:
        raise ValueError(f"{len(missing)} problem(s) have no gold solution to train on, e.g. {missing[:3]}")
    return [{"prompt": template.render(p.question, tokenizer), "completion": p.solution} for p in problems]


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, every digit its own token.

    Single-digit number tokens let a tiny model learn column arithmetic instead of memorising
    a token per number.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>")
    # A minimal chat template, so chat-style prompts also work: the turns' contents, one per line.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    return tokenizer


def build_model(args: SFTScriptArguments, tokenizer):
    """A freshly initialised Qwen2 causal LM sized by the recipe (head_dim 32 or more for vLLM's CPU kernels)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    head_dim = args.hidden_size // args.num_attention_heads
    if head_dim < 32:
        raise ValueError(f"head_dim {head_dim} < 32: vLLM's CPU attention refuses it; use fewer heads")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def run_sft(args: SFTScriptArguments, training_args) -> Path:
    """Train, then save the final model and tokenizer (16-bit-loadable by vLLM) to `output_dir`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTTrainer

    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        records = training_records(args, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype="auto")
    else:
        records = training_records(args)
        corpus = [r["prompt"] + r["completion"] for r in records[: args.tokenizer_corpus_size]]
        tokenizer = build_tokenizer(corpus, args.tokenizer_vocab_size)
        model = build_model(args, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("training on %d records; model has %.2fM parameters", len(records),
             sum(p.numel() for p in model.parameters()) / 1e6)
    (output_dir / "recipe.json").write_text(json.dumps(
        {"script": asdict(args), "training": training_args.to_dict()}, indent=2, default=str))

    callbacks = []
    if args.stop_at_accuracy is not None:


        held_out = load_problems(args.dataset_source, args.accuracy_eval_split, limit=args.accuracy_eval_problems,
                                 seed=args.data_seed_offset)
        template = PromptTemplate(style=args.prompt_style)
        callbacks.append(StopAtAccuracy(tokenizer, [template.render(p.question, tokenizer) for p in held_out],
                                        [p.answer for p in held_out], args.stop_at_accuracy, args.accuracy_eval_every))
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(str(output_dir))  # gathers 16-bit weights under ZeRO-3 (stage3_gather_16bit_weights_on_model_save)
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(str(output_dir))
        metrics = dict(result.metrics, num_records=len(records), steps=trainer.state.global_step,
                       num_parameters=sum(p.numel() for p in model.parameters()))
        if callbacks:
            metrics["held_out_accuracy"] = callbacks[0].history
        (output_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    del trainer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    from trl import SFTConfig


    logging.basicConfig(level=os.environ.get("TREETUNE_LOG", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    script_args, training_args = parse_recipe((SFTScriptArguments, SFTConfig), argv)
    return run_sft(script_args, training_args)


if __name__ == "__main__":
    main()
