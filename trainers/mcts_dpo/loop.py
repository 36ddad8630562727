"""MCTS-DPO's outer loop: rounds of (MCTS with the current policy in vLLM -> step pairs from the
trees -> cDPO against the fixed starting policy -> checkpoint -> engine reopened on it).

Everything a round makes stays in `output_dir/round_<r>/`: `search/` (tree shards, resumable, and
the search metrics), `pairs.jsonl` + `pairs_summary.json`, `train/` (the trainer's checkpoints),
`model/` (the checkpoint, vLLM-loadable, with its `recipe.json` and `metrics.json`), `eval.json`
(greedy accuracy of the new policy, when `eval_limit`), and `state.json`, which records the stages
done. A stopped run restarted on the same output directory resumes in the round it stopped in, at
the first stage not done (the search itself resumes tree by tree; the training, with
`--resume_from_checkpoint auto`, from the round's newest checkpoint). At the top, `config.json` is
the resolved recipe and `metrics.json` gathers all rounds.

Training runs in this process, or, given `accelerate_config` (any config in configs/accelerate/,
as for Step-DPO), as `accelerate launch --module treetune.trainers.mcts_dpo.loop <same recipe>
--train_round r` (the vLLM engine is closed first and the subprocess re-reads the recipe).

Choices where the paper and the released code differ, or where this loop departs from both:
- rounds: the code updates the actor after every 64 trees inside one pass (fully online); the
  paper describes M rounds of "collect with the current policy, then train". Rounds are used
  here (vLLM generation is batched over many trees), each on fresh training problems.
- no ground-truth injection (the code's default `include_gt` prepends the gold next step as a
  candidate): pairs are between the policy's own steps only, so the data stay on-policy.
- the inside value is configurable (`scorer`): the exact arith checker, the policy's own
  un-hinted self-evaluation (`self_eval`; the code hints it with the gold solution), GroundedPRM's
  tool, any PRM (trained here, or released: `--scorer_format qwen | shepherd`), or none (outcome
  reward only at terminals). Terminals are always graded against the gold answer.
- `correct_only` (the code's `--filter`, on in its scripts) and `pair_rejected` ("random", what
  the code always does through its `--choose_random` quirk, or "lowest", the paper's wording).
- the reference model is the starting policy in every round (the code never updates it).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from treetune.data import PromptTemplate, load_problems
from treetune.data.arith import tiny_policy
from treetune.data.step_pairs import load_step_pairs, write_step_pairs
from treetune.rewards.evaluation.greedy import greedy_eval
from treetune.rewards.grading import Grader
from treetune.rewards.outcome import score_outcomes
from treetune.rewards.scorers import close_scorer, scorer_from_args
from treetune.rollouts.run import RolloutArgs, default_prompt_style, make_engine, run_rollout
from treetune.rollouts.scoring import ScorerArgs
from treetune.rollouts.tree_io import read_trees
from treetune.trainers.common import CONFIG_FILE, METRICS_FILE, parse_recipe, setup_logging, write_recipe
from treetune.trainers.distributed import launch_command
from treetune.trainers.mcts_dpo.config import MCTSDPOConfig
from treetune.trainers.mcts_dpo.pairs import mcts_pairs
from treetune.trainers.mcts_dpo.trainer import train_on_pairs

log = logging.getLogger(__name__)

STAGES = ("search", "pairs", "train", "eval")


@dataclass
class MCTSDPOArgs(ScorerArgs):
    """The loop, the search and the pairs; training fields come from `MCTSDPOConfig`, model ones from
    TRL's ModelConfig, the inside value's scorer from `ScorerArgs` (--scorer, --scorer_format, --step_mode)."""

    rounds: int = field(default=3, metadata={"help": "Rounds of search -> pairs -> cDPO (-> greedy eval)."})
    source: str = field(default="arith", metadata={"help": "Problem source the rounds search (see treetune.data.ProblemArgs)."})
    split: str = field(default="train", metadata={"help": "Split of the source the rounds search."})
    data_path: str | None = field(default=None, metadata={"help": "A local file for the source; empty: the hub dataset."})
    problems_per_round: int = field(default=512, metadata={
        "help": "Round r searches problems [r * n, (r + 1) * n) of the split (wrapping around), fresh ones each round."})
    prompt_style: str | None = field(default=None, metadata={
        "help": "bare | plain | chat; default: bare for the tiny policy, chat when the tokenizer has a template, else plain."})
    # search (see rollouts/mcts.py and configs/rollout/mcts.yaml)
    engine: str = field(default="vllm", metadata={"help": "Engine of the search: vllm, or hf (transformers.generate)."})
    kv_cache_gb: float | None = field(default=None, metadata={"help": "vLLM KV cache size in GB; empty: the engine's default."})
    scorer: str | None = field(default="arith_checker", metadata={
        "help": "The search's inside value: arith_checker, tool, self_eval (the policy's un-hinted self-evaluation), "
                "a PRM folder / hub name read as --scorer_format says, or empty for outcome reward only."})
    step_delimiter: str | None = field(default=None, metadata={
        "help": "A search step ends at this text; empty: the separator of --step_mode."})
    step_tokens: int = field(default=32, metadata={"help": "A step is cut at step_delimiter or after this many tokens."})
    search_max_depth: int = field(default=8, metadata={"help": "Most steps on a path of the search tree."})
    search_max_tokens: int = field(default=128, metadata={"help": "Most tokens of a whole solution."})
    search_width: int = field(default=2, metadata={"help": "Candidate steps sampled per expansion (k)."})
    mcts_iterations: int = field(default=8, metadata={"help": "Simulations per move of the root."})
    mcts_root_iterations: int | None = field(default=None, metadata={
        "help": "Simulations at the first move; empty: mcts_iterations."})
    c_puct: float = field(default=1.0, metadata={"help": "Exploration weight of PUCT selection."})
    mcts_length_penalty: float = field(default=1.25, metadata={
        "help": "lambda of the step prior exp(sum log p / len^lambda)."})
    search_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the candidate steps."})
    search_batch_problems: int = field(default=128, metadata={"help": "Problems searched together (one engine batch)."})
    # pairs (see trainers/mcts_dpo/pairs.py)
    pair_rejected: str = field(default="lowest", metadata={
        "help": "lowest: the lowest-Q sibling is rejected (the paper's wording); random: a random non-best sibling "
                "(what the released code does)."})
    max_pairs_per_tree: int = field(default=8, metadata={"help": "Most pairs taken from one tree."})
    min_q_gap: float = field(default=0.0, metadata={"help": "Keep a pair only when chosen Q - rejected Q exceeds this."})
    correct_only: bool = field(default=True, metadata={"help": "Take pairs only from trees whose selected answer is right."})
    # evaluation of every round's policy (greedy), and the distributed launch
    eval_source: str = field(default="arith", metadata={"help": "Problem source of the greedy evaluation after each round."})
    eval_split: str = field(default="test", metadata={"help": "Split of the greedy evaluation."})
    eval_data_path: str | None = field(default=None, metadata={
        "help": "A local file for the evaluation's source (e.g. gsm8k/test.jsonl); empty: the hub dataset."})
    eval_limit: int = field(default=0, metadata={"help": "Problems of the greedy evaluation; 0: no evaluation."})
    eval_max_tokens: int = field(default=128, metadata={"help": "Most tokens of a greedy answer."})
    accelerate_config: str | None = field(default=None, metadata={
        "help": "configs/accelerate/<name>.yaml: train every round under `accelerate launch`; empty: in this process"})
    num_processes: int | None = field(default=None, metadata={
        "help": "With accelerate_config: processes per round's training; empty: the config's own."})
    train_round: int | None = field(default=None, metadata={"help": "internal: train only this round (the subprocess)"})


def round_dir(config, r: int) -> Path:
    return Path(config.output_dir) / f"round_{r}"


def read_state(config, r: int) -> dict:
    path = round_dir(config, r) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"round": r, "done": []}


def mark_done(config, r: int, stage: str, **info) -> None:
    state = read_state(config, r)
    if stage not in state["done"]:
        state["done"].append(stage)
    state.update(info)
    path = round_dir(config, r) / "state.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)  # a kill mid-write never leaves a torn state


def start_policy(model_args) -> str:

    return model_args.model_name_or_path or tiny_policy()


def policy_for(config, model_args, r: int) -> str:
    """Round r searches and trains from the checkpoint of round r - 1 (round 0: the starting policy)."""
    return start_policy(model_args) if r == 0 else str(round_dir(config, r - 1) / "model")


def round_problems(args: MCTSDPOArgs, r: int):

    pool = load_problems(args.source, args.split, path=args.data_path)
    if not pool:
        raise ValueError(f"no problems in {args.source}/{args.split}")
    n = args.problems_per_round
    return [pool[(r * n + i) % len(pool)] for i in range(min(n, len(pool)))]


def rollout_args(args: MCTSDPOArgs, out: Path, seed: int):

    return RolloutArgs(output_dir=str(out), sampler="mcts", engine=args.engine, source=args.source, split=args.split,
                       scorer=args.scorer, scorer_format=args.scorer_format, step_mode=args.step_mode,
                       step_delimiter=args.step_delimiter, step_tokens=args.step_tokens,
                       max_depth=args.search_max_depth, max_tokens=args.search_max_tokens,
                       search_width=args.search_width, mcts_iterations=args.mcts_iterations,
                       mcts_root_iterations=args.mcts_root_iterations, c_puct=args.c_puct,
                       length_penalty=args.mcts_length_penalty, temperature=args.search_temperature,
                       terminal_value="verifier", seed=seed, batch_problems=args.search_batch_problems,
                       kv_cache_gb=args.kv_cache_gb)


def search_round(args: MCTSDPOArgs, config, model_args, r: int, engine, grader) -> dict:
    """MCTS over round r's problems with the engine's (current) policy; trees on disk, resumable."""

    settings = rollout_args(args, round_dir(config, r) / "search", seed=config.seed + 1000 * r)
    style = default_prompt_style(args.prompt_style, bool(model_args.model_name_or_path), engine.tokenizer)
    scorer = scorer_from_args(args, engine)
    started = time.perf_counter()
    try:
        summary = run_rollout(settings, engine, engine.tokenizer, round_problems(args, r), PromptTemplate(style=style),
                              score_tree=lambda trees: score_outcomes(trees, grader), step_scorer=scorer,
                              verifier=grader, progress=True)
    finally:
        close_scorer(scorer)
    summary["search_seconds"] = round(time.perf_counter() - started, 2)
    return summary


def pairs_round(args: MCTSDPOArgs, config, r: int) -> dict:


    d = round_dir(config, r)
    wanted = {p.id for p in round_problems(args, r)}
    trees = [t for t in read_trees(d / "search" / "trees") if t.problem_id in wanted]
    pairs, summary = mcts_pairs(trees, rejected=args.pair_rejected, max_pairs_per_tree=args.max_pairs_per_tree,
                                min_q_gap=args.min_q_gap, correct_only=args.correct_only, seed=config.seed + r)
    write_step_pairs(pairs, d / "pairs.jsonl")
    (d / "pairs_summary.json").write_text(json.dumps(summary, indent=2))
    warn_if_no_preference(summary, config.conservative)
    return summary


def warn_if_no_preference(summary: dict, conservative: bool) -> bool:
    """Warn (and say True) when every pair's visit smoothing sits at its 0.5 cap: the chosen step was
    visited no more than the rejected one, so cDPO's gradient on each pair is zero while the policy
    equals the reference, and the round's training would end where it started."""
    if not (conservative and summary["pairs"] and summary["label_smoothing_at_cap"] == summary["pairs"]):
        return False
    log.warning("all %d pairs have label smoothing 0.5 (no chosen step was visited more than its rejected one): "
                "cDPO learns nothing from them. Search longer (--mcts_iterations), give the search an inside value "
                "(--scorer), or train on the plain preference (--conservative false)", summary["pairs"])
    return True


def train_round(args: MCTSDPOArgs, config, model_args, r: int) -> dict:
    """cDPO on round r's pairs, from round r's policy, against the starting policy; in this process."""
    import copy



    d = round_dir(config, r)
    pairs, _ = load_step_pairs(str(d / "pairs.jsonl"))
    if not pairs:
        raise ValueError(f"{d / 'pairs.jsonl'}: round {r} found no pairs to train on")
    cfg = copy.deepcopy(config)
    cfg.output_dir = str(d / "train")  # trainer checkpoints (resume_from_checkpoint=auto looks here)
    cfg.ref_model_path = config.ref_model_path or start_policy(model_args)
    return train_on_pairs(pairs, cfg, model_args, policy_for(config, model_args, r), d / "model")


def train_subprocess(args: MCTSDPOArgs, argv: list[str], r: int) -> None:
    """The same recipe under `accelerate launch`, training round r only."""

    command = launch_command(args.accelerate_config, ["treetune.trainers.mcts_dpo.loop", *argv, "--train_round", str(r)],
                             num_processes=args.num_processes, python_module=True)
    log.info("round %d training: %s", r, " ".join(command))
    subprocess.run(command, check=True)


def eval_problems(args: MCTSDPOArgs):
    """The greedy evaluation's problems: `eval_limit` of the eval source, from `eval_data_path` when given."""
    return load_problems(args.eval_source, args.eval_split, path=args.eval_data_path, limit=args.eval_limit)


def greedy_round(args: MCTSDPOArgs, model_args, engine, grader=None) -> dict:

    style = default_prompt_style(args.prompt_style, bool(model_args.model_name_or_path), engine.tokenizer)
    problems = eval_problems(args)
    metrics, _ = greedy_eval(engine, engine.tokenizer, problems, PromptTemplate(style=style),
                             max_tokens=args.eval_max_tokens, grader=grader, progress=False)
    return metrics


def open_engine(args: MCTSDPOArgs, model: str):

    engine = make_engine(rollout_args(args, Path("."), 0), model)
    if hasattr(engine, "reset_prefix_cache"):
        engine.reset_prefix_cache()  # a new policy: no cached prefix of the old one may be reused
    return engine


def close_engine(engine) -> None:
    if engine is not None:
        engine.close()
    gc.collect()


def run_loop(args: MCTSDPOArgs, config, model_args, argv: list[str]) -> dict:
    """All rounds, resuming at the first stage not done; returns (and writes) the metrics of every round."""
    from transformers import set_seed


    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    write_recipe(out, args, model_args, config, name=CONFIG_FILE)
    engine = None
    grader = Grader()
    try:
        if args.eval_limit and not (out / "eval_start.json").exists():
            engine = open_engine(args, start_policy(model_args))
            (out / "eval_start.json").write_text(json.dumps(greedy_round(args, model_args, engine, grader), indent=2))
        for r in range(args.rounds):
            d = round_dir(config, r)
            d.mkdir(parents=True, exist_ok=True)
            done = read_state(config, r)["done"]
            if "eval" in done or ("train" in done and not args.eval_limit):
                continue
            policy = policy_for(config, model_args, r)
            if "search" not in done:
                if engine is None or getattr(engine, "model", None) != policy:
                    close_engine(engine)
                    engine = open_engine(args, policy)
                summary = search_round(args, config, model_args, r, engine, grader)
                (d / "search_summary.json").write_text(json.dumps(summary, indent=2))
                mark_done(config, r, "search", search_seconds=summary["search_seconds"])
            if "pairs" not in read_state(config, r)["done"]:
                summary = pairs_round(args, config, r)
                mark_done(config, r, "pairs", pairs=summary["pairs"])
            if "train" not in read_state(config, r)["done"]:
                close_engine(engine)  # the trainer gets the memory (and, distributed, the cores)
                engine = None
                started = time.perf_counter()
                if args.accelerate_config:
                    train_subprocess(args, argv, r)
                else:
                    train_round(args, config, model_args, r)
                    gc.collect()
                mark_done(config, r, "train", train_seconds=round(time.perf_counter() - started, 2))
            if args.eval_limit and "eval" not in read_state(config, r)["done"]:
                # the engine on the new checkpoint, with a fresh prefix cache, serves the next round's search too
                engine = open_engine(args, str(d / "model"))
                metrics = greedy_round(args, model_args, engine, grader)
                (d / "eval.json").write_text(json.dumps(metrics, indent=2))
                mark_done(config, r, "eval", greedy_accuracy=metrics["accuracy"])
    finally:
        close_engine(engine)
        grader.close()
    return collect_metrics(args, config)


def collect_metrics(args: MCTSDPOArgs, config) -> dict:
    """Per round: pairs, search and training seconds, search accuracy, greedy accuracy; into metrics.json."""
    out = Path(config.output_dir)
    rounds = []
    for r in range(args.rounds):
        d = round_dir(config, r)
        state = read_state(config, r)
        row = {"round": r, "stages_done": state["done"], "search_seconds": state.get("search_seconds"),
               "train_seconds": state.get("train_seconds"), "pairs": state.get("pairs"),
               "greedy_accuracy": state.get("greedy_accuracy")}
        if (d / "pairs_summary.json").exists():
            p = json.loads((d / "pairs_summary.json").read_text())
            row.update(search_selected_accuracy=p["selected_correct"], trees_with_pairs=p["trees_with_pairs"],
                       label_smoothing_mean=p["label_smoothing_mean"])
        if (d / "model" / METRICS_FILE).exists():
            t = json.loads((d / "model" / METRICS_FILE).read_text())
            row.update(train_steps=t.get("steps"), train_loss=t.get("train_loss"))
        rounds.append(row)
    metrics = {"rounds": rounds}
    if (out / "eval_start.json").exists():
        metrics["greedy_accuracy_start"] = json.loads((out / "eval_start.json").read_text())["accuracy"]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    from trl import ModelConfig


    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, config, model_args = parse_recipe((MCTSDPOArgs, MCTSDPOConfig, ModelConfig), argv)
    if args.pair_rejected not in ("lowest", "random"):
        raise ValueError(f"pair_rejected must be 'lowest' or 'random', not {args.pair_rejected!r}")
    if args.train_round is not None:  # the `accelerate launch` subprocess: one round's training only
        return train_round(args, config, model_args, args.train_round)
    return run_loop(args, config, model_args, argv)


if __name__ == "__main__":
    main()
