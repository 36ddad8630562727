"""The online RL job (`launch/treepo.py`): problems -> prompts -> greedy accuracy before ->
`TreePOTrainer` (rollout engine synced every step) -> greedy accuracy after, on the same engine.

Every rank builds its own engine (in-process vLLM, weights loaded in place) unless the rollouts go
to a pool of `vllm serve` servers, which all ranks share and which reload each step's weights.
Writes the model, `recipe.json`, `metrics.json` (before / after accuracy, decoded tokens, seconds in
rollout / reward / sync / training, per-step logs) and `training.png` to `--output_dir`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from treetune.data import load_problems
from treetune.rewards.evaluation.greedy import greedy_eval, write_eval
from treetune.rewards.grading import Grader
from treetune.rewards.scorers import close_scorer, scorer_from_args
from treetune.rollouts.run import EngineArgs
from treetune.trainers.common import (
    load_policy,
    parse_recipe,
    peft_config,
    run_metrics,
    setup_logging,
    train_and_save,
    write_metrics,
    write_recipe,
)
from treetune.trainers.treepo.config import TreePOConfig, TreePOScriptArguments
from treetune.trainers.treepo.rewards import OutcomeReward, StepScorerReward
from treetune.trainers.treepo.rollout import PromptBook
from treetune.trainers.treepo.trainer import TreePOTrainer, totals_report

log = logging.getLogger(__name__)

LOGGED = ("reward", "rewards/outcome/mean", "rollout/decoded_tokens", "rollout/prefix_cache_hit_rate",
          "time/rollout_seconds", "time/reward_seconds", "time/sync_seconds", "time/training_seconds", "masked_tree_share",
          "sampling/importance_sampling_ratio/mean", "loss", "step_time")


def engine_args(args: TreePOScriptArguments, model: str | None) -> EngineArgs:
    """The engine part of the recipe (`model`: the one the user named, None for the tiny policy)."""
    return EngineArgs(model_name_or_path=model, engine=args.engine,
                      server_urls=args.server_urls, kv_cache_gb=args.kv_cache_gb, prompt_style=args.prompt_style)


def evaluate(args: TreePOScriptArguments, config: TreePOConfig, engine, tokenizer, template, grader, out: Path,
             name: str) -> dict | None:
    """Greedy accuracy of the engine's current policy on the evaluation problems (main process only)."""
    if args.eval_problems <= 0:
        return None
    problems = load_problems(args.eval_source or args.source, args.eval_split, path=args.eval_data_path,
                             limit=args.eval_problems)
    metrics, rows = greedy_eval(engine, tokenizer, problems, template,
                                max_tokens=args.eval_max_tokens or config.max_completion_length, grader=grader)
    write_eval(out, metrics, rows, name=name)
    return metrics


def plot_training(history: list[dict], path: Path) -> None:
    """Reward and decoded tokens per step, the picture a person looks at first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "reward" in h]
    if not steps:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(steps, [h["reward"] for h in history if "reward" in h], marker="o")
    left.set(xlabel="optimizer step", ylabel="mean reward", title="reward")
    tokens = [(h["step"], h["rollout/decoded_tokens"]) for h in history if "rollout/decoded_tokens" in h]
    if tokens:
        right.plot(*zip(*tokens), marker="o")
    right.set(xlabel="optimizer step", ylabel="tokens", title="decoded tokens per generation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_treepo(args: TreePOScriptArguments, config: TreePOConfig, model_args, engine=None) -> dict:
    """Train with online RL on trees; returns the metrics written to `metrics.json`."""
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import set_seed

    set_seed(config.seed)
    state = PartialState()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = args.load()
    if not problems:
        raise ValueError(f"no training problems from source {args.source!r} split {args.split!r}")
    path, tokenizer, model = load_policy(model_args)
    eargs = engine_args(args, model_args.model_name_or_path)
    template = eargs.prompt_template(tokenizer)
    book, rows = PromptBook(), []
    for problem in problems:
        text = template.render(problem.question, tokenizer)
        book.add(text, problem, template.render_ids(problem.question, tokenizer))
        rows.append({"prompt": text})
    write_recipe(out, args, model_args, config)
    if config.use_vllm and engine is not None:
        raise ValueError("--use_vllm true samples from TRL's own vLLM: pass no engine")
    own_engine = engine is None and not config.use_vllm
    if own_engine:
        engine = eargs.make_engine(path, seed=config.seed + state.process_index)
    elif engine is not None:  # an engine from an earlier run may hold other weights: serve the start policy
        engine.update_weights(named_tensors=[(n, p.detach()) for n, p in model.named_parameters()])
    grader = Grader()
    scorer = None
    try:
        # with TRL's vLLM (built by the trainer) a scorer that samples the policy has no engine yet
        scorer = scorer_from_args(args, engine)
        reward_funcs = [OutcomeReward(grader)]
        weights = [1.0]
        if scorer is not None:
            reward_funcs.append(StepScorerReward(scorer, args.step_mode, args.scorer_aggregation))
            weights.append(args.scorer_weight)
        if args.overlong_buffer:
            from trl.rewards import get_soft_overlong_punishment

            reward_funcs.append(get_soft_overlong_punishment(config.max_completion_length, args.overlong_buffer))
            weights.append(1.0)
        if config.reward_weights is None:
            config.reward_weights = weights
        trainer = TreePOTrainer(model=model, reward_funcs=reward_funcs, args=config, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, peft_config=peft_config(model_args), engine=engine,
                                book=book, shared_engine=args.engine == "servers", sync_dir=args.sync_dir)
        engine = trainer.engine
        before = evaluate(args, config, engine, tokenizer, template, grader, out, "eval_before") if state.is_main_process else None
        state.wait_for_everyone()
        started = time.perf_counter()
        result, checkpoint = train_and_save(trainer, out, tokenizer, config.resume_from_checkpoint)
        train_seconds = time.perf_counter() - started
        trainer.vllm_generation.sync_weights()  # the final policy, for the evaluation after
        after = evaluate(args, config, engine, tokenizer, template, grader, out, "eval_after") if state.is_main_process else None
        metrics = {}
        if state.is_main_process:
            history = trainer.state.log_history
            totals = totals_report(trainer)
            steps = max(trainer.state.global_step, 1)
            totals["train_seconds"] = train_seconds
            totals["seconds_per_step"] = train_seconds / steps
            totals["training_seconds"] = max(train_seconds - totals["rollout_seconds"] - totals["reward_seconds"]
                                             - totals["sync_seconds"], 0.0)
            totals["sync_share_of_step_time"] = totals["sync_seconds"] / max(train_seconds, 1e-9)
            metrics = dict(run_metrics(trainer, result, checkpoint), policy=path, prompt_style=template.style,
                           sampler=config.sampler, advantage=config.advantage, fork=config.fork,
                           greedy_before=before, greedy_after=after, **totals,
                           history=[{k: h[k] for k in ("step", *LOGGED) if k in h} for h in history])
            write_metrics(out, metrics)
            plot_training(history, out / "training.png")
        state.wait_for_everyone()
        return metrics
    finally:
        close_scorer(scorer)
        grader.close()
        if own_engine:
            engine.close()


def main(argv: list[str] | None = None) -> dict:
    from trl import ModelConfig

    setup_logging()
    args, config, model_args = parse_recipe((TreePOScriptArguments, TreePOConfig, ModelConfig), argv)
    return run_treepo(args, config, model_args)


if __name__ == "__main__":
    main()
