"""A short real Step-DPO run on the tiny policy that records what actually ran, to check a distributed setup.

    accelerate launch --config_file configs/accelerate/zero3.yaml -m treetune.trainers.distributed_check \\
        --output_dir out/check [--max_steps 8 --save_steps 4 --resume_from_checkpoint out/check/checkpoint-4 ...]

Pairs are arith step pairs: after a gold prefix, the gold next step is chosen and the same step
with its result off by one is rejected. treetune's `StepDPOTrainer` (a TRL `DPOTrainer`) trains
with a full reference model built from the policy path, so DeepSpeed wraps the policy and
prepares the reference model. Each rank writes `distributed/rank<i>.json` in output_dir: world size, backend,
the engine and ZeRO stage, the share of parameters it holds locally, the losses, and a checksum of
the full final weights (equal on every rank when gradients were really reduced). The final model
is saved with `save_final_model`, loadable by vLLM. Every `StepDPOConfig` and TRL `ModelConfig` field
can be overridden; `--use_peft true` trains a LoRA adapter instead (rank 8 on all linear layers
unless `--lora_r` / `--lora_target_modules` say otherwise; saved as `adapter/` plus the merged model).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from treetune.data.arith import arith_problems, check_solution
from treetune.data.step_pairs import StepPair
from treetune.trainers.common import (
    LORA_RENAMED,
    load_policy,
    parse_recipe,
    peft_config,
    resume_point,
    save_final_model,
    setup_logging,
)
from treetune.trainers.distributed import distributed_summary, local_parameter_share
from treetune.trainers.step_dpo.config import StepDPOConfig
from treetune.trainers.step_dpo.trainer import StepDPOTrainer, build_step_dataset

log = logging.getLogger(__name__)

# Seconds of training on two CPU cores; few pairs seen more than once and a high constant learning
# rate, so the loss visibly falls within the run.
DEFAULTS = ["--max_steps", "6", "--per_device_train_batch_size", "2", "--learning_rate", "1e-4",
            "--lr_scheduler_type", "constant", "--beta", "0.5", "--max_length", "96", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", "--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "all-linear"]


@dataclass
class CheckArguments:
    """The check's data; the policy (`model_name_or_path`, empty: the arith tiny policy) and LoRA come
    from TRL's ModelConfig."""

    num_pairs: int = field(default=8, metadata={"help": "Preference pairs built from arith training problems."})


def corrupt_one_step(solution: str, rng: random.Random) -> str:
    """The solution with the result of one equation line off by one (a wrong step, later lines untouched)."""
    lines = solution.split("\n")
    equations = [i for i, line in enumerate(lines) if "=" in line]
    if not equations:
        raise ValueError(f"no equation step to corrupt in {solution!r}")
    i = rng.choice(equations)
    left, right = lines[i].rsplit("=", 1)
    value = int(right.strip())
    lines[i] = f"{left}={value + 1 if value < 2 or rng.random() < 0.5 else value - 1}"
    return "\n".join(lines)


def preference_pairs(num_pairs: int, seed: int = 0) -> list:
    """Step pairs: a gold prefix, then the gold step against the same step with its result off by
    one (checked wrong there by the exact step checker)."""

    rng = random.Random(seed)
    pairs = []
    for problem in arith_problems("train", limit=num_pairs, seed=seed):
        lines = problem.solution.split("\n")
        k = rng.choice([i for i, line in enumerate(lines) if "=" in line])
        wrong = corrupt_one_step(lines[k], rng)
        if check_solution(problem, "\n".join(lines[:k] + [wrong])) != k:
            raise AssertionError(f"{problem.id}: the corrupted step {wrong!r} is not where the checker finds the error")
        pairs.append(StepPair(prompt=problem.question, initial_reason_steps="".join(l + "\n" for l in lines[:k]),
                              chosen=lines[k] + "\n", rejected=wrong + "\n", answer=problem.answer,
                              problem_id=problem.id, step_index=k))
    return pairs


def weights_checksum(trainer) -> float:
    """Sum of squares of the full policy weights (gathered under ZeRO-3); a collective call."""
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model)
    params = list(model.parameters())
    total = torch.zeros((), dtype=torch.float64)
    if trainer.is_deepspeed_enabled and trainer.deepspeed.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            for p in params:
                total += p.detach().double().pow(2).sum()
    else:
        for p in params:
            total += p.detach().double().pow(2).sum()
    return float(total)


def _step_counter():
    """A callback counting the optimizer steps taken in this process (a resumed run takes fewer)."""
    from transformers import TrainerCallback

    class StepCounter(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

    return StepCounter()


def run_check(args: CheckArguments, config, model_args) -> dict:
    """Train, save the final model, and write this rank's record; returns it."""
    from transformers import set_seed

    set_seed(config.seed)
    # Built after the config, so under ZeRO-3 with zero3_init_flag the weights load already partitioned.
    path, tokenizer, model = load_policy(model_args)
    counter = _step_counter()
    dataset, _ = build_step_dataset(preference_pairs(args.num_pairs, config.seed), tokenizer, "bare",
                                    config.max_length, config.max_prompt_length)
    trainer = StepDPOTrainer(model=model, args=config, processing_class=tokenizer, callbacks=[counter],
                             peft_config=peft_config(model_args), train_dataset=dataset)
    checkpoint = resume_point(config.output_dir, config.resume_from_checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    record = distributed_summary(trainer)
    record.update(
        policy=path,
        global_step=trainer.state.global_step,
        steps_this_run=counter.steps,
        resumed_from=checkpoint,
        train_loss=result.metrics.get("train_loss"),
        losses={h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
        reward_margins={h["step"]: h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h},
        policy_local_share=local_parameter_share(trainer.model_wrapped),
        ref_local_share=local_parameter_share(trainer.ref_model) if trainer.ref_model is not None else None,
        weights_checksum=weights_checksum(trainer),
    )
    out = Path(config.output_dir)
    save_final_model(trainer, out, tokenizer)
    ranks = out / "distributed"
    ranks.mkdir(parents=True, exist_ok=True)
    (ranks / f"rank{record['process_index']}.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> dict:
    import sys

    from trl import ModelConfig

    setup_logging()
    argv = DEFAULTS + list(sys.argv[1:] if argv is None else argv)  # later flags win
    args, config, model_args = parse_recipe((CheckArguments, StepDPOConfig, ModelConfig), argv, LORA_RENAMED)
    return run_check(args, config, model_args)


if __name__ == "__main__":
    main()
