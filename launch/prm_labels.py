"""PRM labels from trees on disk: `python launch/prm_labels.py --trees_path DIR/trees --output_dir OUT`.

Monte Carlo step values from each tree's own trajectories, topped up with fresh completions by the
policy where fewer than --k share a prefix; hard, soft or SCAN labels; optional consensus with the
arith checker. Writes to --output_dir: `labels.jsonl` (TRL stepwise records for
launch/train_prm.py), `config.json` and `metrics.json`; a finished folder is not redone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treetune.data import Problem
from treetune.data.arith import check_solution
from treetune.rewards.grading import Grader
from treetune.rewards.labels.mc import consensus, mc_estimate, to_stepwise
from treetune.rewards.outcome import score_outcomes
from treetune.rollouts.run import EngineArgs, SamplingArgs, make_engine, redefault
from treetune.rollouts.scoring import STEP_MODES, ScorerArgs
from treetune.rollouts.tree_io import read_trees
from treetune.trainers.common import parse_config, setup_logging


@dataclass
class PRMLabelArgs(EngineArgs):
    """The trees, the policy that tops thin prefixes up, and the labels."""

    output_dir: str = field(default="outputs/prm_labels", metadata={
        "help": "Where labels.jsonl, config.json and metrics.json go."})
    trees_path: str = field(default="", metadata={
        "help": "A folder of tree shards (launch/rollout.py's output_dir/trees) or one file."})
    prompt_style: str | None = field(default=None, metadata={
        "help": "Not used here: top-up completions continue each tree's own prompt."})
    k: int = field(default=4, metadata={
        "help": "Completions per step prefix: the tree's own first, then fresh samples from the policy."})
    step_mode: str = redefault(ScorerArgs, "step_mode", "line")
    kind: str = field(default="hard", metadata={
        "help": "Labels: hard (MC value > 0), soft (the MC value), scan (SCAN's confidence-weighted soft labels)."})
    truncate: bool = field(default=True, metadata={
        "help": "Drop the labels after the first zero-value step (Qwen's convention)."})
    consensus: str = field(default="none", metadata={
        "help": "none | arith_checker: keep a solution only where MC and the exact checker agree on the first error."})
    min_confidence: float = field(default=0.0, metadata={
        "help": "scan: drop problems whose share of correct trajectories is below this."})
    limit_trees: int | None = field(default=None, metadata={"help": "Use only the first N trees; empty: all."})
    temperature: float = redefault(SamplingArgs, "temperature", 1.0)
    max_tokens: int = redefault(SamplingArgs, "max_tokens", 128)
    seed: int = redefault(SamplingArgs, "seed", 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"field 'step_mode': expected one of {', '.join(STEP_MODES)}, not {self.step_mode!r}")
        if self.consensus not in ("none", "arith_checker"):
            raise ValueError(f"field 'consensus': expected none or arith_checker, not {self.consensus!r}")


def checker_first_errors(solutions, trees) -> list[int]:
    """The exact arith checker's first wrong step of every solution (the consensus judge on arith);
    a solution that stops early is wrong at its last step, where MC can see it."""

    problems = {}
    for tree in trees:
        extra = {k: v for k, v in tree.problem.items() if k not in ("question", "source")}
        problems[tree.problem_id] = Problem(tree.problem_id, tree.problem.get("question", ""), tree.answer,
                                            source=tree.problem.get("source", "arith"), extra=extra)
    firsts = []
    for s in solutions:
        first = check_solution(problems[s.problem_id], "\n".join(s.steps))
        firsts.append(min(first, len(s.steps) - 1) if first != -1 else -1)
    return firsts


def run(args: PRMLabelArgs, engine=None) -> dict:
    """Write `labels.jsonl` (prompt, completions, labels), `config.json` and `metrics.json` to
    output_dir; returns the metrics. A finished folder is returned as it is (the labels are not redone).
    `engine`: one already serving the policy, shared by a caller running several jobs (left open);
    else one is started from `args`."""
    out = Path(args.output_dir)
    metrics_path = out / "metrics.json"
    if metrics_path.exists():
        return json.loads(metrics_path.read_text())
    if not args.trees_path:
        raise ValueError("--trees_path is required: a folder of trees (launch/rollout.py writes output_dir/trees)")
    trees = list(read_trees(args.trees_path))[: args.limit_trees]
    if not trees:
        raise ValueError(f"{args.trees_path}: no trees found")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    owned = engine is None
    engine = make_engine(args) if owned else engine
    try:
        with Grader() as grader:
            ungraded = [t for t in trees if any("outcome" not in leaf.scores for leaf in t.leaves())]
            if ungraded:
                score_outcomes(ungraded, grader)
            solutions = mc_estimate(trees, engine, grader, k=args.k, step_mode=args.step_mode,
                                    temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    finally:
        if owned:
            engine.close()
    kept = solutions
    if args.consensus == "arith_checker":
        kept = consensus(solutions, checker_first_errors(solutions, trees))
    records = to_stepwise(kept, args.kind, min_confidence=args.min_confidence, truncate=args.truncate)
    tmp = out / "labels.jsonl.tmp"  # written whole, then renamed: a killed run leaves no half file
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(out / "labels.jsonl")
    labels = [label for r in records for label in r["labels"]]
    metrics = {"trees": len(trees), "solutions": len(solutions), "kept_after_consensus": len(kept),
               "records": len(records), "step_labels": len(labels),
               "positive_share": sum(float(x) for x in labels) / max(1, len(labels)),
               "labels_file": str(out / "labels.jsonl")}
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config((PRMLabelArgs,), argv)
    metrics = run(args)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
