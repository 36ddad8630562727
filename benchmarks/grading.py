"""Grading throughput on the MATH-500 gold solutions: one process against the worker pool.

    python benchmarks/grading.py --output grading.json [--data ../shared/data/math500/test.jsonl]

Every pair goes through math-verify (the string shortcut is off, so the answers are really
parsed and compared). Workers are started and warmed up before the clock starts: their start-up
is paid once per run, not per answer. Writes answers per second for each mode, and the count
graded correct (all 500 expected).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from treetune.data import load_problems
from treetune.rewards.grading import Grader

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "math500" / "test.jsonl"


def measure(grader: Grader, outputs: list[str], golds: list[str], repeats: int) -> dict:
    grader.grade_many(outputs[:8], golds[:8])  # warm-up: start the workers, import math-verify
    started = time.perf_counter()
    for _ in range(repeats):
        verdicts = grader.grade_many(outputs, golds)
    seconds = time.perf_counter() - started
    return {"answers_per_second": round(repeats * len(outputs) / seconds, 1), "seconds": round(seconds, 3),
            "correct": sum(verdicts), "total": len(outputs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    problems = load_problems("math500", path=args.data)
    outputs, golds = [p.solution for p in problems], [p.answer for p in problems]
    cores = os.cpu_count() or 1
    results = {"problems": len(problems), "cpu_count": cores, "modes": {}}
    for name, processes in [("one_process", 0), ("pool_1", 1), (f"pool_{cores}", cores)]:
        with Grader(processes=processes, string_shortcut=False) as grader:
            results["modes"][name] = measure(grader, outputs, golds, args.repeats)
        print(name, results["modes"][name])
    with Grader(processes=cores) as grader:  # the default path: equal strings skip math-verify
        results["modes"][f"pool_{cores}_with_string_shortcut"] = measure(grader, outputs, golds, args.repeats)
    base = results["modes"]["one_process"]["answers_per_second"]
    results["pool_speedup"] = round(results["modes"][f"pool_{cores}"]["answers_per_second"] / base, 2)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
