"""ThinkPRM on the proving ground: ProcessBench-style F1 of a trained arith verifier against the
exact checker on held-out tiny-policy solutions, its per-step verdict agreement, and best-of-16
with it against majority@16 on arith test problems.

    python launch/think_prm_data.py --config configs/think_prm_data/arith.yaml
    python launch/sft.py --config configs/sft/arith_think_prm.yaml
    python benchmarks/think_prm_arith.py --verifier outputs/think_prm/round1 --output think_prm_arith.json
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
    parser.add_argument("--verifier", required=True, help="a ThinkPRM checkpoint (launch/sft.py on think_prm_data records)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--eval_problems", type=int, default=150, help="test problems x 4 samples for the F1")
    parser.add_argument("--chains", default="1,4", help="K values (parallel chains averaged) for the F1")
    parser.add_argument("--bon_problems", type=int, default=100)
    parser.add_argument("--bon_chains", type=int, default=1)
    args = parser.parse_args()

    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import policy_build, tiny_policy
    from treetune.rewards.evaluation.best_of_n import evaluate_leaves, problem_trees, sample_graded, write_report
    from treetune.rewards.evaluation.processbench import arith_cases, evaluate_splits, sample_arith_trees
    from treetune.rewards.grading import Grader
    from treetune.rewards.scorers.think_prm import ThinkPRM
    from treetune.rollouts.engines import VLLMEngine
    from treetune.rollouts.run import RolloutArgs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="think_prm_arith_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"start_policy": policy_build(), "verifier": args.verifier, "eval_problems": args.eval_problems, "bon_problems": args.bon_problems}
    thresholds = [round(0.05 * i, 2) for i in range(1, 20)]

    eval_trees = sample_arith_trees(args.eval_problems, seed=1)
    questions, steps, labels = arith_cases(eval_trees)
    result["solutions"] = len(labels)
    result["erroneous"] = sum(l != -1 for l in labels)
    result["processbench_arith"] = {}
    for k in [int(x) for x in args.chains.split(",") if x.strip()]:
        prm = ThinkPRM(args.verifier, chains=k, temperature=0.6 if k > 1 else 0.0, seed=0)
        started = time.perf_counter()
        verified = prm.verify(questions, steps, progress=True)
        seconds = time.perf_counter() - started
        prm.close()
        entry: dict = {"chains": k, "temperature": 0.6 if k > 1 else 0.0, "seconds": round(seconds, 1),
                       "solutions_per_second": len(steps) / seconds}
        for readout in ("hybrid", "labels"):
            scores = [v.step_scores(readout) for v in verified]
            sweep = evaluate_splits({"arith": scores}, {"arith": labels}, thresholds)
            best = max(sweep, key=lambda t: sweep[t]["average_f1"])
            entry[readout] = {"best_threshold": float(best), **sweep[best]["splits"]["arith"],
                              "f1_at_0.5": sweep["0.5"]["splits"]["arith"]["f1"]}
        # the ThinkPRM paper's binary F1 (is there any mistake?), positive class = erroneous
        predicted_wrong = [sum(v.yes) / len(v.yes) < 0.5 for v in verified]
        truly_wrong = [l != -1 for l in labels]
        tp = sum(p and t for p, t in zip(predicted_wrong, truly_wrong))
        precision = tp / max(1, sum(predicted_wrong))
        recall = tp / max(1, sum(truly_wrong))
        entry["binary_f1"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        # per-step verdicts against the checker, on the steps the gold labels judge
        agree = total = 0
        for v, label, s in zip(verified, labels, steps):
            judged = len(s) if label == -1 else label + 1
            for chain_labels in v.labels:
                for i in range(judged):
                    agree += chain_labels[i] == (1 if label == -1 or i < label else 0)
                    total += 1
        entry["step_verdict_agreement"] = agree / max(1, total)
        entry["format_complete"] = sum(all(len(c) > 0 and "\\boxed{" in c for c in v.chains) for v in verified) / len(verified)
        result["processbench_arith"][f"K={k}"] = entry
        print(json.dumps(entry, indent=2), flush=True)

    template = PromptTemplate(style="bare")
    problems = load_problems("arith", "test", limit=args.bon_problems)
    selectors = ["majority", "prm_last", "prm_min", "weighted_prm_last", "first"]
    bon = RolloutArgs(output_dir=str(work / "bon"), limit=args.bon_problems, sampler="flat", trajectories=16,
                      max_tokens=128, seed=2)
    with Grader() as grader:
        with VLLMEngine(tiny_policy()) as engine:
            sample_graded(bon, engine, problems, template, grader)
        started = time.perf_counter()
        metrics, rows = evaluate_leaves(problem_trees(work / "bon" / "trees", problems), problems, selectors, grader,
                                        scorer=ThinkPRM(args.verifier), seed=2)
        result["bon_scoring_seconds"] = round(time.perf_counter() - started, 1)
        write_report(work / "bon", metrics, rows, selectors, f"best-of-16 with ThinkPRM ({len(rows)} arith problems)")
    result["best_of_16"] = {name: metrics["selectors"][name]["16"]["accuracy"] for name in metrics["selectors"]}
    result["best_of_16"]["pass@16"] = metrics["pass_at_k"]["16"]
    result["best_of_16"]["note"] = ("ThinkPRM K=1 greedy chain per sample; prm_last = P(yes) of the whole solution, "
                                    "weighted_prm_last = the paper's weighted majority vote")
    print(json.dumps(result["best_of_16"], indent=2), flush=True)
    Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
