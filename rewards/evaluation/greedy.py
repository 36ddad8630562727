"""Greedy evaluation of a policy on problems: accuracy by math-verify, and on arith the exact
step checker's view (solutions whose every step is right, and the share of steps right)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from treetune.data import Problem, PromptTemplate
from treetune.data.arith import check_solution, first_error_kind
from treetune.rewards.grading import Grader
from treetune.rollouts.engines import Engine, GenerationRequest, SamplingSettings


def greedy_eval(
    engine: Engine,
    tokenizer,
    problems: Sequence[Problem],
    template: PromptTemplate,
    max_tokens: int = 256,
    grader: Grader | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """(metrics, per-problem rows) for greedy decoding of every problem."""

    requests = [
        GenerationRequest(template.render_ids(p.question, tokenizer), SamplingSettings(n=1, temperature=0.0, max_tokens=max_tokens))
        for p in problems
    ]
    results = engine.generate(requests, progress=progress)
    outputs = [r.completions[0].text for r in results]
    own_grader = grader is None
    grader = grader or Grader()
    try:
        correct = grader.grade_many(outputs, [p.answer for p in problems], progress=progress)
    finally:
        if own_grader:
            grader.close()
    rows, steps_right, steps_total, process_ok = [], 0, 0, 0
    for problem, result, output, ok in zip(problems, results, outputs, correct):
        row = {"id": problem.id, "output": output, "gold": problem.answer, "correct": ok,
               "tokens": len(result.completions[0].token_ids), "finish_reason": result.completions[0].finish_reason}
        if problem.source == "arith":
            first_wrong = check_solution(problem, output)
            needed = problem.extra["num_steps"] + 1
            row["first_wrong_step"] = first_wrong
            if not ok:
                row["error_kind"] = first_error_kind(output, first_wrong)
            steps_right += needed if first_wrong == -1 else min(first_wrong, needed)
            steps_total += needed
            process_ok += first_wrong == -1
        rows.append(row)
    n = max(1, len(problems))
    metrics = {
        "problems": len(problems),
        "accuracy": sum(correct) / n,
        "mean_tokens": sum(r["tokens"] for r in rows) / n,
        "truncated": sum(r["finish_reason"] == "length" for r in rows) / n,
    }
    if steps_total:
        metrics["all_steps_right"] = process_ok / n
        metrics["step_accuracy"] = steps_right / steps_total
    return metrics, rows


def write_eval(output_dir: str | Path, metrics: dict, rows: list[dict], name: str = "greedy") -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_metrics.json").write_text(json.dumps(metrics, indent=2))
    with (out / f"{name}_samples.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
