"""ProcessBench-style evaluation of step scorers (the official protocol).

A solution's predicted first wrong step is the first step whose score falls below the threshold
(-1 when none does). Per split: accuracy on erroneous solutions (exact index match), accuracy on
correct ones (predicting -1), and F1 = their harmonic mean; papers report the unweighted mean of
the splits' F1. A threshold sweep shows how the choice moves it.

Cases come from ProcessBench files (`load_processbench`) or, on the proving ground, from sampled
arith solutions labelled by the exact checker (`arith_cases`, `sample_arith_trees`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from treetune.data import Problem, PromptTemplate, load_problems
from treetune.data.arith import check_solution, tiny_policy
from treetune.data.records import DataError, read_records, require
from treetune.data.steps import split_steps
from treetune.rollouts.engines import VLLMEngine
from treetune.rollouts.flat import FlatSampler, FlatSettings
from treetune.rollouts.run import new_tree
from treetune.rollouts.tree import ReasoningTree

ARITH_FIELDS = ("start", "ops", "num_steps")


def load_processbench(path: str | Path) -> list[dict]:
    """ProcessBench rows (id, problem, steps, label) from a JSON array or JSONL file."""
    def convert(row: dict, line: int) -> dict:
        label = require(row, "label", path, line, int)
        steps = require(row, "steps", path, line, list)
        if not -1 <= label < len(steps):

            raise DataError(path, line, f"{label} is not -1 or a step index below {len(steps)}", field="label")
        return {"id": str(row.get("id", line)), "problem": require(row, "problem", path, line), "steps": steps, "label": label}

    rows, _ = read_records(path, convert)
    return rows


def first_below(scores: Sequence[float], threshold: float) -> int:
    """Index of the first step scoring below `threshold`, or -1."""
    for i, s in enumerate(scores):
        if s < threshold:
            return i
    return -1


def processbench_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """acc_err, acc_corr and their harmonic mean F1 for one split."""
    err = [(p, l) for p, l in zip(predictions, labels) if l != -1]
    corr = [(p, l) for p, l in zip(predictions, labels) if l == -1]
    acc_err = sum(p == l for p, l in err) / len(err) if err else 0.0
    acc_corr = sum(p == -1 for p, _ in corr) / len(corr) if corr else 0.0
    f1 = 2 * acc_err * acc_corr / (acc_err + acc_corr) if acc_err + acc_corr else 0.0
    return {"acc_err": acc_err, "acc_corr": acc_corr, "f1": f1, "erroneous": len(err), "correct": len(corr)}


def evaluate_splits(scores_by_split: dict[str, list[list[float]]], labels_by_split: dict[str, list[int]],
                    thresholds: Sequence[float] = (0.5,)) -> dict:
    """Per threshold: each split's metrics and the unweighted mean F1 over splits."""
    out = {}
    for threshold in thresholds:
        per_split = {split: processbench_metrics([first_below(s, threshold) for s in scores_by_split[split]],
                                                 labels_by_split[split])
                     for split in scores_by_split}
        out[f"{threshold:g}"] = {"splits": per_split,
                                 "average_f1": sum(m["f1"] for m in per_split.values()) / max(1, len(per_split))}
    return out


# -- arith cases: truth from the exact checker ------------------------------------------------------

def tree_problem(tree: ReasoningTree) -> Problem:
    """The arith problem a tree was sampled for, rebuilt from what the tree stores of it."""
    return Problem(id=tree.problem_id, question=tree.problem.get("question", tree.prompt), answer=tree.answer,
                   source="arith", extra={k: v for k, v in tree.problem.items() if k in ARITH_FIELDS})


def checker_label(problem: Problem, steps: Sequence[str]) -> int:
    """The ProcessBench label the exact checker gives an arith solution: its first wrong step, -1
    when every step is right; a solution that stops before its answer is wrong at its last step."""
    first = check_solution(problem, "\n".join(steps))
    return min(first, len(steps) - 1) if first != -1 else -1


def arith_cases(trees: Sequence[ReasoningTree], step_mode: str = "line") -> tuple[list[str], list[list[str]], list[int]]:
    """(questions, steps, checker label) for every finished leaf of arith trees with at least one step."""
    questions, solutions, labels = [], [], []
    for tree in trees:
        problem = tree_problem(tree)
        for _, text in tree.iter_trajectories():
            steps = split_steps(text, step_mode)
            if not steps:
                continue
            questions.append(problem.question)
            solutions.append(steps)
            labels.append(checker_label(problem, steps))
    return questions, solutions, labels


def sample_arith_trees(count: int, seed: int = 1, model: str | None = None, samples: int = 4,
                       max_tokens: int = 128) -> list[ReasoningTree]:
    """`samples` solutions to each of the first `count` arith test problems from a policy in vLLM
    (default: the tiny policy), the held-out cases a PRM is scored on against the checker."""
    problems = load_problems("arith", "test", limit=count)
    with VLLMEngine(model or tiny_policy()) as engine:
        trees = [new_tree(p, PromptTemplate(style="bare"), engine.tokenizer) for p in problems]
        return list(FlatSampler(FlatSettings(n=samples, max_tokens=max_tokens, seed=seed)).grow(engine, trees))
