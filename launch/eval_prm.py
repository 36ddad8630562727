"""ProcessBench-style evaluation of a step scorer.

    python launch/eval_prm.py --prm_path out/prm --processbench ../data/processbench/gsm8k.json,../data/processbench/math.json
    python launch/eval_prm.py --prm_path out/prm --arith_sample 300      # truth from the exact arith checker

Writes metrics.json (per threshold: acc_err, acc_corr, F1 per split and their unweighted mean).

`launch/eval_prm.py`: ProcessBench-protocol evaluation of a step scorer, on ProcessBench files
and on arith solutions whose truth comes from the exact checker.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from treetune.data import Problem, PromptTemplate, load_problems
from treetune.data.arith import check_solution, tiny_policy
from treetune.data.steps import split_steps
from treetune.rewards.evaluation.processbench import evaluate_splits, load_processbench
from treetune.rewards.scorers.arith_checker import ArithCheckerScorer
from treetune.rewards.scorers.released import load_prm
from treetune.rollouts.engines import VLLMEngine
from treetune.rollouts.flat import FlatSampler, FlatSettings
from treetune.rollouts.run import new_tree
from treetune.rollouts.tree_io import read_trees


@dataclass
class EvalPRMArgs:
    output_dir: str = "outputs/eval_prm"
    scorer: str = "prm"  # prm | arith_checker
    prm_path: str | None = None
    prm_format: str = "treetune"  # treetune | qwen (Qwen2.5-Math-PRM) | shepherd (Math-Shepherd) | thinkprm | grounded_gen
    separator: str = "\n"
    processbench: str = ""  # comma-separated ProcessBench-format files; the split is the file name
    arith_trees: str | None = None  # trees of arith solutions (launch/rollout.py, launch/best_of_n.py)
    arith_sample: int = 0  # or: sample this many arith test problems x 4 with the tiny policy
    thresholds: str = "0.05:0.95:0.05"  # start:stop:step, or a comma-separated list


def parse_thresholds(text: str) -> list[float]:
    if ":" in text:
        start, stop, step = (float(x) for x in text.split(":"))
        count = int(round((stop - start) / step)) + 1
        return [round(start + i * step, 6) for i in range(count)]
    return [float(x) for x in text.split(",") if x.strip()]


def make_scorer(args: EvalPRMArgs):

    if args.scorer == "arith_checker":
        return ArithCheckerScorer()
    if args.scorer == "prm":
        if not args.prm_path:
            raise ValueError("scorer 'prm' needs --prm_path")

        return load_prm(args.prm_path, args.prm_format, separator=args.separator)
    raise ValueError(f"unknown scorer {args.scorer!r}; expected prm or arith_checker")


def arith_cases(trees) -> tuple[list[str], list[list[str]], list[int]]:
    """(questions, steps, first wrong step by the checker) for every finished leaf of arith trees."""

    questions, solutions, labels = [], [], []
    for tree in trees:
        problem = Problem(id=tree.problem_id, question=tree.problem["question"], answer=tree.answer, source="arith",
                          extra={k: v for k, v in tree.problem.items() if k in ("start", "ops", "num_steps")})
        for _, text in tree.iter_trajectories():
            steps = split_steps(text, "line")
            if not steps:
                continue
            first = check_solution(problem, "\n".join(steps))
            questions.append(problem.question)
            solutions.append(steps)
            # a solution that stops early (checker: "one past the last step") is wrong at its last step
            labels.append(min(first, len(steps) - 1) if first != -1 else -1)
    return questions, solutions, labels


def sample_arith_trees(count: int, seed: int = 1):

    problems = load_problems("arith", "test", limit=count)
    with VLLMEngine(tiny_policy()) as engine:
        trees = [new_tree(p, PromptTemplate(style="bare"), engine.tokenizer) for p in problems]
        return list(FlatSampler(FlatSettings(n=4, max_tokens=128, seed=seed)).grow(engine, trees))


def run(args: EvalPRMArgs) -> dict:


    scorer = make_scorer(args)
    scores, labels = {}, {}
    for path in [p.strip() for p in args.processbench.split(",") if p.strip()]:
        rows = load_processbench(path)
        split = Path(path).stem
        scores[split] = scorer.score([r["problem"] for r in rows], [r["steps"] for r in rows])
        labels[split] = [r["label"] for r in rows]
    trees = list(read_trees(args.arith_trees)) if args.arith_trees else sample_arith_trees(args.arith_sample) if args.arith_sample else []
    if trees:
        questions, solutions, truth = arith_cases(trees)
        scores["arith"] = scorer.score(questions, solutions)
        labels["arith"] = truth
    if not scores:
        raise ValueError("nothing to evaluate: give --processbench files, --arith_trees or --arith_sample")
    by_threshold = evaluate_splits(scores, labels, parse_thresholds(args.thresholds))
    best = max(by_threshold, key=lambda t: by_threshold[t]["average_f1"])
    metrics = {"scorer": args.scorer, "best_threshold": float(best), "best_average_f1": by_threshold[best]["average_f1"],
               "best": by_threshold[best], "by_threshold": by_threshold}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser


    (args,) = TrlParser((EvalPRMArgs,)).parse_args_and_config(argv)
    metrics = run(args)
    print(json.dumps({"best_threshold": metrics["best_threshold"], "best_average_f1": metrics["best_average_f1"],
                      "splits": metrics["best"]["splits"]}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
