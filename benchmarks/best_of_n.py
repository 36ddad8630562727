"""Best-of-N on arith with the tiny policy: the accuracy-vs-N table for every selector, and
sampling and grading throughput.

    python benchmarks/best_of_n.py --output best_of_n.json [--problems 300] [--n 64] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--workdir", default=None, help="keep the run's files here (default: a temporary folder)")
    args = parser.parse_args()

    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import policy_build, tiny_policy
    from treetune.rewards.evaluation.best_of_n import evaluate_leaves, problem_trees, sample_graded, write_report
    from treetune.rewards.grading import Grader
    from treetune.rollouts.run import RolloutArgs, make_engine
    from treetune.rollouts.tree_io import read_trees

    selectors = ["first", "majority", "max_logprob"]

    with tempfile.TemporaryDirectory() as scratch:
        run = RolloutArgs(output_dir=args.workdir or scratch, limit=args.problems, sampler="flat", trajectories=args.n,
                          max_tokens=128)
        problems = load_problems("arith", "test", limit=args.problems)
        result: dict = {"problems": len(problems), "n": args.n, "start_policy": policy_build()}
        with Grader() as grader:
            engine = make_engine(run, tiny_policy())
            try:
                started = time.perf_counter()
                summary = sample_graded(run, engine, problems, PromptTemplate(style="bare"), grader)
                result["sampling_seconds"] = round(time.perf_counter() - started, 1)
                result["samples_per_second"] = summary["trajectories"] / result["sampling_seconds"]
            finally:
                engine.close()
            trees = list(read_trees(Path(run.output_dir) / "trees"))
            outputs = [t.path_text(l.id) for t in trees for l in t.leaves()]
            golds = [t.answer for t in trees for _ in t.leaves()]
            started = time.perf_counter()
            grader.grade_many(outputs, golds)
            seconds = time.perf_counter() - started
            result["grading_answers_per_second"] = len(outputs) / seconds
            with Grader(string_shortcut=False) as strict:
                started = time.perf_counter()
                strict.grade_many(outputs[:2000], golds[:2000])
                result["grading_answers_per_second_all_through_math_verify"] = 2000 / (time.perf_counter() - started)
            started = time.perf_counter()
            metrics, rows = evaluate_leaves(problem_trees(Path(run.output_dir) / "trees", problems), problems, selectors, grader)
            write_report(run.output_dir, metrics, rows, selectors, f"best-of-N on arith ({len(rows)} problems)")
            result["evaluation_seconds"] = round(time.perf_counter() - started, 1)
        result["pass_at_k"] = metrics["pass_at_k"]
        result["selectors"] = metrics["selectors"]
        result["summary_markdown"] = (Path(run.output_dir) / "summary.md").read_text()
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(result["summary_markdown"])
    print({k: v for k, v in result.items() if k not in ("pass_at_k", "selectors", "summary_markdown")})


if __name__ == "__main__":
    main()
