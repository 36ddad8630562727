"""GroundedPRM's tool against ground truth: per-step verdicts on the tiny policy's arith solutions
against the exact checker, and on GSM8K's real gold solutions (their calculator annotations must
pass; the same solutions with one annotation's result changed must be caught). Throughput in
steps checked per second.

    python benchmarks/grounded_tool.py --output grounded_tool.json

(a) arith: `--arith_problems` test problems x `--samples` samples (VLLMEngine, tiny policy),
    split into lines; the checker's label of step i is "correct" before its first wrong step,
    "incorrect" at it (steps after it carry no label, the ProcessBench convention). Agreement is
    measured on the steps the tool can verify; coverage is their share. With and without
    grounding (every operand must appear in the problem or an earlier step).
(b) GSM8K test gold solutions: the share whose annotations all pass, the pass rate of the
    final-answer line against the step before it, and the catch rate when one annotation's result
    (chosen at random) is changed to result + 1 or result x 2 (the visible number after it too).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def arith_part(args) -> dict:
    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import tiny_policy
    from treetune.rewards.evaluation.processbench import arith_cases
    from treetune.rewards.scorers.tool import StepTool
    from treetune.rollouts.engines import VLLMEngine
    from treetune.rollouts.flat import FlatSampler, FlatSettings
    from treetune.rollouts.run import new_tree

    problems = load_problems("arith", "test", limit=args.arith_problems)
    with VLLMEngine(tiny_policy(), seed=args.seed) as engine:
        trees = [new_tree(p, PromptTemplate(style="bare"), engine.tokenizer) for p in problems]
        trees = list(FlatSampler(FlatSettings(n=args.samples, max_tokens=128, seed=args.seed)).grow(engine, trees))
    questions, solutions, first_wrong = arith_cases(trees)
    out: dict = {"problems": len(problems), "solutions": len(solutions), "steps": sum(len(s) for s in solutions),
                 "solutions_all_correct": sum(f == -1 for f in first_wrong) / len(first_wrong)}
    for grounding in (False, True):
        with StepTool(workers=args.workers, timeout=args.timeout, grounding=grounding) as tool:
            tool.check(["warm up"], [["1+1=2"]])
            started = time.perf_counter()
            checks = tool.check(questions, solutions)
            seconds = time.perf_counter() - started
        counts: Counter = Counter()
        for steps, label, path_checks in zip(solutions, first_wrong, checks):
            for i in range(len(steps) if label == -1 else label + 1):
                truth = "correct" if label == -1 or i < label else "incorrect"
                counts[(truth, path_checks[i].verdict)] += 1
        labelled = sum(counts.values())
        verifiable = sum(n for (_, v), n in counts.items() if v != "unverifiable")
        agree = counts[("correct", "correct")] + counts[("incorrect", "incorrect")]
        flagged = counts[("correct", "incorrect")] + counts[("incorrect", "incorrect")]
        wrong_verifiable = counts[("incorrect", "incorrect")] + counts[("incorrect", "correct")]
        out["grounding" if grounding else "arithmetic_only"] = {
            "labelled_steps": labelled,
            "verifiable_steps": verifiable,
            "coverage": verifiable / labelled,
            "agreement_on_verifiable": agree / verifiable,
            "agreement_counting_unverifiable_as_wrong": agree / labelled,
            "error_precision": counts[("incorrect", "incorrect")] / max(1, flagged),
            "error_recall_on_verifiable": counts[("incorrect", "incorrect")] / max(1, wrong_verifiable),
            "confusion": {f"checker_{t}/tool_{v}": n for (t, v), n in sorted(counts.items())},
            "seconds": round(seconds, 3),
            "steps_per_second": sum(len(s) for s in solutions) / seconds,
        }
    return out


def _changed(result: str, how: str) -> str:
    value = Decimal(result)
    return str(value + 1 if how == "plus_one" else value * 2)


def perturb(solution: str, index: int, how: str) -> str:
    """`solution` with the result of its `index`-th annotation changed, and the number shown right after it."""
    match = list(ANNOTATION.finditer(solution))[index]
    new = _changed(match.group(2), how)
    tail = solution[match.end():]
    shown = re.match(r"[\d,]*\.?\d+", tail)
    if shown and shown.group().replace(",", "") == match.group(2):
        tail = new + tail[shown.end():]
    return solution[:match.start()] + f"<<{match.group(1)}={new}>>" + tail


def gsm8k_part(args) -> dict:
    from treetune.data import load_problems
    from treetune.data.steps import split_steps
    from treetune.rewards.scorers.tool import StepTool

    problems = load_problems("gsm8k", "test", path=args.gsm8k_path, limit=args.gsm8k_limit)
    questions = [p.question for p in problems]
    solutions = [split_steps(p.solution, "line") for p in problems]
    out: dict = {"solutions": len(problems)}
    with StepTool(workers=args.workers, timeout=args.timeout) as tool:
        tool.check(["warm up"], [["1+1=2"]])
        started = time.perf_counter()
        checks = tool.check(questions, solutions)
        seconds = time.perf_counter() - started
        annotations = [[c for step in path for c in step.checks if c.equation.source == "annotation"] for path in checks]
        answers = [c for path in checks for step in path for c in step.checks if c.equation.source == "answer"]
        prose = [c for path in checks for step in path for c in step.checks if c.equation.source == "prose"]
        with_annotations = [a for a in annotations if a]
        out["gold"] = {
            "solutions_with_annotations": len(with_annotations),
            "annotations": sum(len(a) for a in annotations),
            "annotations_passing": sum(bool(c.ok) for a in annotations for c in a) / max(1, sum(len(a) for a in annotations)),
            "solutions_all_annotations_pass": sum(all(c.ok for c in a) for a in with_annotations) / len(with_annotations),
            "failing_annotations": [c.equation.text for a in annotations for c in a if not c.ok][:20],
            "answer_lines_checked": len(answers),
            "answer_lines_passing": sum(bool(c.ok) for c in answers) / max(1, len(answers)),
            "answer_line_failures": [c.equation.text for c in answers if c.ok is False][:10],
            "prose_equations_checked": len(prose),
            "prose_equations_passing": sum(bool(c.ok) for c in prose) / max(1, len(prose)),
            "prose_failures": [c.equation.text for c in prose if c.ok is False][:10],
            "steps": sum(len(s) for s in solutions),
            "seconds": round(seconds, 3),
            "steps_per_second": sum(len(s) for s in solutions) / seconds,
        }
        rng = random.Random(args.seed)
        for how in ("plus_one", "times_two"):
            cases = []
            for problem, question, gold in zip(problems, questions, checks):
                found = list(ANNOTATION.finditer(problem.solution))
                if not found:
                    continue
                index = rng.randrange(len(found))
                if how == "times_two" and Decimal(found[index].group(2)) == 0:
                    continue  # 0 x 2 is still 0
                changed = perturb(problem.solution, index, how)
                steps = split_steps(changed, "line")
                marker = f"<<{found[index].group(1)}={_changed(found[index].group(2), how)}>>"
                cases.append((question, steps, next(i for i, s in enumerate(steps) if marker in s), gold))
            started = time.perf_counter()
            results = tool.check([c[0] for c in cases], [c[1] for c in cases])
            seconds = time.perf_counter() - started
            caught = sum(r[i].verdict == "incorrect" for (_, _, i, _), r in zip(cases, results))
            # other steps that the change made the tool flag (besides the answer line, which may
            # rightly disagree with a changed last result)
            newly = Counter()
            for (_, _, i, gold), r in zip(cases, results):
                for j, (before, after) in enumerate(zip(gold, r)):
                    if j != i and after.verdict == "incorrect" and before.verdict != "incorrect":
                        newly["answer_line" if after.checks[0].equation.source == "answer" else "other"] += 1
            out[f"perturbed_{how}"] = {
                "solutions": len(cases),
                "caught": caught / len(cases),
                "answer_lines_newly_flagged": newly["answer_line"],
                "other_steps_newly_flagged": newly["other"],
                "steps_per_second": sum(len(c[1]) for c in cases) / seconds,
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--arith_problems", type=int, default=200)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--gsm8k_path", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"))
    parser.add_argument("--gsm8k_limit", type=int, default=None, help="default: all 1319 test solutions")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip_arith", action="store_true")
    args = parser.parse_args()

    result: dict = {"settings": vars(args)}
    if not args.skip_arith:
        from treetune.data.arith import policy_build

        result["start_policy"] = policy_build()
        result["arith"] = arith_part(args)
        print(json.dumps(result["arith"], indent=2), flush=True)
    result["gsm8k"] = gsm8k_part(args)
    print(json.dumps(result["gsm8k"], indent=2), flush=True)
    Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
