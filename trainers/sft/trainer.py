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

import logging
from pathlib import Path

from treetune.data import PromptTemplate, load_problems
from treetune.data.answers import gsm8k_boxed_solution
from treetune.data.records import read_records, require
from treetune.trainers.common import (
    load_model,
    load_tokenizer,
    parse_recipe,
    peft_config,
    run_metrics,
    setup_logging,
    train_and_save,
    write_metrics,
    write_recipe,
)
from treetune.trainers.sft.accuracy_stop import StopAtAccuracy
from treetune.trainers.sft.config import RENAMED, SFTScriptArguments

log = logging.getLogger(__name__)


def training_records(args: SFTScriptArguments, tokenizer=None) -> list[dict[str, str]]:
    """The prompt/completion records the recipe trains on."""

    if args.source == "records":
        if not args.data_path:
            raise ValueError("source 'records' needs data_path (a JSONL of prompt/completion rows)")
        rows, _ = read_records(
            args.data_path,
            lambda r, line: {"prompt": require(r, "prompt", args.data_path, line), "completion": require(r, "completion", args.data_path, line)},
            limit=args.limit,
        )
        return rows
    problems = args.load()
    template = PromptTemplate(style=args.prompt_style)
    missing = [p.id for p in problems if not p.solution]
    if missing:
        raise ValueError(f"{len(missing)} problem(s) have no gold solution to train on, e.g. {missing[:3]}")
    return [{"prompt": template.render(p.question, tokenizer), "completion": completion_of(p)} for p in problems]


def completion_of(problem) -> str:
    """The gold solution a problem trains on; GSM8K's in the boxed format the prompts ask for."""
    return gsm8k_boxed_solution(problem.solution) if problem.source == "gsm8k" else problem.solution


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


def run_sft(args: SFTScriptArguments, training_args, model_args) -> Path:
    """Train, then save the final model and tokenizer (vLLM-loadable: LoRA merged, ZeRO-3 weights
    gathered), `recipe.json` and `metrics.json` to `output_dir`."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if model_args.model_name_or_path:
        tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
        records = training_records(args, tokenizer)
        model = load_model(model_args.model_name_or_path, model_args)
    else:
        records = training_records(args)
        corpus = [r["prompt"] + r["completion"] for r in records[: args.tokenizer_corpus_size]]
        tokenizer = build_tokenizer(corpus, args.tokenizer_vocab_size)
        model = build_model(args, tokenizer)
    log.info("training on %d records; model has %.2fM parameters", len(records),
             sum(p.numel() for p in model.parameters()) / 1e6)
    write_recipe(output_dir, args, model_args, training_args)

    callbacks = []
    if args.stop_at_accuracy is not None:
        held_out = load_problems(args.source, args.accuracy_eval_split, limit=args.accuracy_eval_problems,
                                 seed=args.problem_seed)
        template = PromptTemplate(style=args.prompt_style)
        callbacks.append(StopAtAccuracy(tokenizer, [template.render(p.question, tokenizer) for p in held_out],
                                        [p.answer for p in held_out], args.stop_at_accuracy, args.accuracy_eval_every))
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config(model_args),
    )
    result, checkpoint = train_and_save(trainer, output_dir, tokenizer, training_args.resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        metrics = dict(run_metrics(trainer, result, checkpoint), num_records=len(records),
                       num_parameters=sum(p.numel() for p in model.parameters()))
        if callbacks:
            metrics["held_out_accuracy"] = callbacks[0].history
        write_metrics(output_dir, metrics)
    del trainer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    from trl import ModelConfig, SFTConfig

    setup_logging()
    script_args, training_args, model_args = parse_recipe((SFTScriptArguments, SFTConfig, ModelConfig), argv, RENAMED)
    return run_sft(script_args, training_args, model_args)


if __name__ == "__main__":
    main()
