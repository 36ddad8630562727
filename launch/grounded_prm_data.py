"""Reasoning trees -> GroundedPRM training data: tool-checked steps, hybrid reward backed up through
the tree, the agreement filter, and rationale-format SFT records for a generative PRM.

    python launch/grounded_prm_data.py --config configs/grounded_prm_data/arith.yaml [--field value ...]

Any sampler works: TreePO segment trees and flat samples are split into steps afterwards; with
`--sampler mcts` (or beam / dvts) the search itself is driven by the tool's step verdicts (and
MCTS's finished nodes by the outcome grader), as in GroundedPRM.

Writes to --output_dir: `trees/` (the sampler's trees, graded; resumable), `step_trees.jsonl`
(one node per step, with the scores "tool", "verdict", "grounded", "grounded_reward",
"grounded_visits"), `rationale.jsonl` (prompt / completion / messages records), `config.json`
and `metrics.json`. The algorithm lives in `treetune.rewards.labels.grounded`. Train the
generative PRM on the records with the SFT recipe:

    accelerate launch launch/sft.py --config configs/sft/arith.yaml --source records \\
        --data_path OUT/rationale.jsonl --model_name_or_path MODEL --max_length 2048 --output_dir PRM
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treetune.data.arith import tiny_policy
from treetune.rewards.grading import Grader
from treetune.rewards.labels import grounded as gp
from treetune.rewards.outcome import score_outcomes
from treetune.rewards.scorers.tool import StepTool, ToolStepScorer
from treetune.rollouts.run import RolloutArgs, make_engine, run_rollout
from treetune.rollouts.tree_io import read_trees
from treetune.trainers.common import parse_config, setup_logging


@dataclass
class GroundedDataArgs(RolloutArgs):
    """The rollout fields (problems, engine, sampling, sampler; `step_mode` splits the paths into
    steps, the tool drives a step search) plus GroundedPRM's own."""

    output_dir: str = field(default="outputs/grounded_prm_data", metadata={
        "help": "Folder for trees/, step_trees.jsonl, rationale.jsonl, config.json and metrics.json."})
    gamma: float = field(default=0.9, metadata={"help": "Decay of the reward backed up to a node's ancestors."})
    simulations: int = field(default=0, metadata={
        "help": "Top each unfinished step node up to this many finished continuations with fresh rollouts (0: none)."})
    simulation_max_tokens: int = field(default=128, metadata={"help": "Token limit of one fresh rollout."})
    grounding: bool = field(default=True, metadata={
        "help": "A step's operands must appear in the problem or an earlier step (off for GSM8K-style data)."})
    check_answers: bool = field(default=True, metadata={
        "help": "Check a final-answer step against the result of the step before it."})
    tool_workers: int = field(default=2, metadata={"help": "Sandboxed sympy worker processes of the tool."})
    tool_timeout: float = field(default=2.0, metadata={"help": "Seconds one tool check may take before it is killed."})
    chat_records: bool = field(default=False, metadata={
        "help": "Render record prompts through the policy tokenizer's chat template (else plain text)."})


def run(args: GroundedDataArgs, engine=None) -> dict:
    """Sample (resumable), tool-check, back up, filter and write the records; returns the metrics.
    `engine`: one already serving the policy, shared by a caller running several jobs (left open);
    else one is started from `args`."""
    if args.scorer not in (None, "tool"):
        raise ValueError(f"field 'scorer': {args.scorer!r}, but GroundedPRM data is labelled by its tool, which also "
                         "drives a step search; leave --scorer empty (or 'tool')")
    out = Path(args.output_dir)
    model = args.model_name_or_path or tiny_policy()
    problems = args.load()
    owned = engine is None
    engine = make_engine(args, model) if owned else engine
    tokenizer = engine.tokenizer
    metrics: dict = {}
    try:
        with Grader() as grader, StepTool(workers=args.tool_workers, timeout=args.tool_timeout, grounding=args.grounding,
                                          check_answers=args.check_answers) as tool:
            # a step search (mcts, beam, dvts) is driven by the tool itself, MCTS's finished nodes by the grader
            search = dict(step_scorer=ToolStepScorer(tool), verifier=grader) if args.sampler in ("mcts", "beam", "dvts") else {}
            metrics["rollout"] = run_rollout(args, engine, tokenizer, problems, args.prompt_template(tokenizer),
                                             lambda trees: score_outcomes(trees, grader), **search)
            wanted = {p.id for p in problems}
            trees = [t for t in read_trees(out / "trees") if t.problem_id in wanted]
            step_trees, simulated = gp.label_trees(
                trees, tool, args.step_mode, args.gamma, engine=engine, grader=grader, simulations=args.simulations,
                simulation_max_tokens=args.simulation_max_tokens, temperature=args.temperature, seed=args.seed,
                progress=True)
            if args.simulations > 0:
                metrics["simulated_completions"] = simulated
    finally:
        if owned:
            engine.close()
    gp.write_step_trees(step_trees, out / "step_trees.jsonl")
    kept, finished = gp.agreeing_paths_of(step_trees)
    records = gp.rationale_records(kept, tokenizer if args.chat_records else None)
    gp.write_records(records, out / "rationale.jsonl")
    metrics.update(gp.data_metrics(step_trees, kept, finished, records))
    if args.source == "arith":
        metrics["checker_agreement"] = gp.checker_agreement(kept, {t.problem_id: t for t in step_trees})
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config((GroundedDataArgs,), argv)
    metrics = run(args)
    print(json.dumps({k: v for k, v in metrics.items() if k != "rollout"}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
