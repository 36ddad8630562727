"""PRM labels from trees on disk: `python launch/prm_labels.py --trees_path DIR/trees --output_dir OUT`.

Monte Carlo step values from each tree's own trajectories, topped up with fresh completions by the
policy where fewer than --k share a prefix; hard, soft or SCAN labels; optional consensus with the
arith checker. Writes `labels.jsonl` (TRL stepwise records for launch/train_prm.py) and
`summary.json`.

PRM training data from trees on disk: Monte Carlo step labels (topped up by the policy where a
tree is thin), an optional consensus filter, written as TRL-style stepwise records.

Used by `launch/prm_labels.py` and by the main job; `launch/train_prm.py` reads its `labels.jsonl`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from treetune.data import Problem
from treetune.data.arith import check_solution, tiny_policy
from treetune.rewards.grading import Grader
from treetune.rewards.labels.mc import consensus, mc_estimate, to_stepwise
from treetune.rewards.outcome import score_outcomes
from treetune.rollouts.engines import VLLMEngine
from treetune.rollouts.tree_io import read_trees


@dataclass
class PRMLabelArgs:
    output_dir: str = "outputs/prm_labels"
    trees_path: str = ""  # a folder of tree shards (launch/rollout.py's output_dir/trees)
    model_name_or_path: str | None = None  # the policy that tops thin prefixes up; empty: the arith tiny policy
    k: int = 4  # completions per step prefix (from the tree first, then fresh samples)
    step_mode: str = "line"  # line | blank_line
    kind: str = "hard"  # hard | soft | scan
    truncate: bool = True  # drop labels after the first zero-value step (Qwen's convention)
    consensus: str = "none"  # none | arith_checker: keep a solution only where MC and the checker agree on the first error
    min_confidence: float = 0.0  # scan: problems whose share of correct trajectories is below this are dropped
    limit_trees: int | None = None
    temperature: float = 1.0
    max_tokens: int = 128
    seed: int = 0
    kv_cache_gb: float | None = None


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


def run(args: PRMLabelArgs) -> dict:
    """Write `labels.jsonl` (prompt, completions, labels) and `summary.json` to output_dir.
    A finished folder is returned as it is (the labels are not redone)."""


    out = Path(args.output_dir)
    summary_path = out / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    if not args.trees_path:
        raise ValueError("--trees_path is required: a folder of trees (launch/rollout.py writes output_dir/trees)")
    trees = list(read_trees(args.trees_path))[: args.limit_trees]
    if not trees:
        raise ValueError(f"{args.trees_path}: no trees found")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    with Grader() as grader, VLLMEngine(args.model_name_or_path or tiny_policy(), seed=args.seed,
                                        kv_cache_gb=args.kv_cache_gb) as engine:
        ungraded = [t for t in trees if any("outcome" not in leaf.scores for leaf in t.leaves())]
        if ungraded:
            score_outcomes(ungraded, grader)
        solutions = mc_estimate(trees, engine, grader, k=args.k, step_mode=args.step_mode,
                                temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    kept = solutions
    if args.consensus == "arith_checker":
        kept = consensus(solutions, checker_first_errors(solutions, trees))
    elif args.consensus != "none":
        raise ValueError(f"consensus {args.consensus!r}: expected none or arith_checker")
    records = to_stepwise(kept, args.kind, min_confidence=args.min_confidence, truncate=args.truncate)
    tmp = out / "labels.jsonl.tmp"  # written whole, then renamed: a killed run leaves no half file
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(out / "labels.jsonl")
    labels = [label for r in records for label in r["labels"]]
    summary = {"trees": len(trees), "solutions": len(solutions), "kept_after_consensus": len(kept),
               "records": len(records), "step_labels": len(labels),
               "positive_share": sum(float(x) for x in labels) / max(1, len(labels)),
               "labels_file": str(out / "labels.jsonl")}
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser


    (args,) = TrlParser((PRMLabelArgs,)).parse_args_and_config(argv)
    summary = run(args)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
