"""Reasoning trees -> GroundedPRM training data: tool-checked steps, hybrid reward backed up through
the tree, the agreement filter, and rationale-format SFT records for a generative PRM.

    python launch/grounded_prm_data.py --config configs/grounded_prm_data/arith.yaml [--field value ...]

Any sampler works: TreePO segment trees and flat samples are split into steps afterwards; with
`--sampler mcts` (or beam / dvts) the search itself is driven by the tool's step verdicts (and
MCTS's finished nodes by the outcome grader), as in GroundedPRM.

Writes to --output_dir: `trees/` (the sampler's trees, graded; resumable), `step_trees.jsonl`
(one node per step, with the scores "tool", "verdict", "grounded", "grounded_reward",
"grounded_visits"), `rationale.jsonl` (prompt / completion / messages records), `config.json`
and `metrics.json`. Train the generative PRM on the records with the SFT recipe:

    accelerate launch launch/sft.py --config configs/sft/arith.yaml --dataset_source records \\
        --dataset_path OUT/rationale.jsonl --model_name_or_path MODEL --max_length 2048 --output_dir PRM
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from treetune.data import Problem, PromptTemplate, load_problems
from treetune.data.arith import check_solution, tiny_policy
from treetune.rewards.grading import Grader
from treetune.rewards.labels import grounded as gp
from treetune.rewards.outcome import score_outcomes
from treetune.rewards.scorers.tool import StepTool, ToolStepScorer
from treetune.rollouts.run import RolloutArgs, default_prompt_style, make_engine, run_rollout
from treetune.rollouts.tree_io import read_trees


@dataclass
class GroundedDataArgs(RolloutArgs):
    """The rollout fields (sampler, model, problems) plus GroundedPRM's own."""

    output_dir: str = "outputs/grounded_prm_data"
    step_mode: str = "line"  # how path texts split into steps: line | blank_line | step_k
    gamma: float = 0.9  # decay of the backup to ancestors
    simulations: int = 0  # top each step node up to this many finished continuations with fresh rollouts
    simulation_max_tokens: int = 128
    grounding: bool = True  # operands must appear in the problem or an earlier step (off for GSM8K-style data)
    check_answers: bool = True  # check a final-answer step against the result before it
    tool_workers: int = 2
    tool_timeout: float = 2.0
    chat_records: bool = False  # render prompts through the policy tokenizer's chat template (else plain text)


def checker_agreement(paths, trees_by_id) -> dict:
    """On arith: how the kept labels compare with the exact checker's, over the steps up to its first error."""

    counts: Counter = Counter()
    for path in paths:
        tree = trees_by_id[path.problem_id]
        problem = Problem(id=path.problem_id, question=path.question, answer=tree.answer, source="arith",
                          extra={k: v for k, v in tree.problem.items() if k in ("start", "ops", "num_steps")})
        first = check_solution(problem, "\n".join(path.steps))
        first = min(first, len(path.steps) - 1) if first != -1 else -1
        for i, label in enumerate(path.labels):
            if first == -1 or i <= first:
                counts["agree" if label == (first == -1 or i < first) else "disagree"] += 1
            else:
                counts["after_first_error"] += 1
    labelled = counts["agree"] + counts["disagree"]
    return {"labels_compared": labelled, "agreement": counts["agree"] / labelled if labelled else None,
            "labels_after_first_error": counts["after_first_error"]}


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser


    (args,) = TrlParser((GroundedDataArgs,)).parse_args_and_config(argv)
    out = Path(args.output_dir)
    model = args.model_name_or_path or tiny_policy()
    problems = load_problems(args.source, args.split, path=args.data_path, limit=args.limit, seed=0)
    engine = make_engine(args, model)
    tokenizer = engine.tokenizer
    style = default_prompt_style(args.prompt_style, bool(args.model_name_or_path), tokenizer)
    metrics: dict = {}
    try:
        with Grader() as grader, StepTool(workers=args.tool_workers, timeout=args.tool_timeout, grounding=args.grounding,
                                          check_answers=args.check_answers) as tool:
            # a step search (mcts, beam, dvts) is driven by the tool itself, MCTS's finished nodes by the grader
            search = dict(step_scorer=ToolStepScorer(tool), verifier=grader) if args.sampler in ("mcts", "beam", "dvts") else {}
            metrics["rollout"] = run_rollout(args, engine, tokenizer, problems, PromptTemplate(style=style),
                                             lambda trees: score_outcomes(trees, grader), **search)
            wanted = {p.id for p in problems}
            trees = [t for t in read_trees(out / "trees") if t.problem_id in wanted]
            step_trees = [gp.to_step_tree(t, args.step_mode) for t in trees]
            gp.annotate_tool(step_trees, tool, progress=True)
            if args.simulations > 0:
                metrics["simulated_completions"] = gp.simulate(step_trees, engine, tool, grader, k=args.simulations,
                                                               step_mode=args.step_mode, temperature=args.temperature,
                                                               max_tokens=args.simulation_max_tokens, seed=args.seed)
            for tree in step_trees:
                gp.backup(tree, args.gamma)
    finally:
        engine.close()
    with (out / "step_trees.jsonl").open("w") as f:
        for tree in step_trees:
            f.write(tree.to_json() + "\n")
    kept, finished = [], 0
    for tree in step_trees:
        paths, total = gp.agreeing_paths(tree)
        kept += paths
        finished += total
    records = gp.rationale_records(kept, tokenizer if args.chat_records else None)
    gp.write_records(records, out / "rationale.jsonl")
    verdicts = Counter(n.scores["tool"] for t in step_trees for n in t.nodes[1:])
    metrics.update({
        "problems": len(step_trees),
        "step_nodes": sum(len(t.nodes) - 1 for t in step_trees),
        "tool_verdicts": {"correct": verdicts[1], "incorrect": verdicts[-1], "unverifiable": verdicts[0]},
        "finished_paths": finished,
        "kept_paths": len(kept),
        "kept_share": len(kept) / finished if finished else 0.0,
        "kept_correct_outcome": sum(p.outcome for p in kept),
        "records": len(records),
        "records_positive": sum(r["label"] == "+" for r in records),
        "records_negative": sum(r["label"] == "-" for r in records),
    })
    if args.source == "arith":
        metrics["checker_agreement"] = checker_agreement(kept, {t.problem_id: t for t in step_trees})
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: v for k, v in metrics.items() if k != "rollout"}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
