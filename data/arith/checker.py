"""The exact arith step checker: the index of a solution's first wrong step (the ProcessBench
convention, -1 when every step is right), and what kind of error that step makes."""

from __future__ import annotations

import re

from treetune.data.answers import extract_answer
from treetune.data.arith.problems import EQUATION, PHRASES, apply_op
from treetune.data.problem import Problem
from treetune.data.steps import split_steps


def problem_ops(problem: Problem) -> tuple[int, list[tuple[str, int]]]:
    """The start value and operations of an arith problem (stored in `extra`, else parsed from the text)."""
    if "ops" in problem.extra:
        return int(problem.extra["start"]), [(op, int(n)) for op, n in problem.extra["ops"]]
    start = int(re.search(r"has (\d+) ", problem.question).group(1))
    ops = []
    for sentence in problem.question.split(". ")[1:]:
        for op, phrases in PHRASES.items():
            for phrase in phrases:
                pattern = re.escape(phrase).replace(re.escape("{P}"), r"\w+").replace(re.escape("{n}"), r"(\d+)")
                found = re.match(pattern.rstrip(r"\."), sentence)
                if found:
                    ops.append((op, int(found.group(1))))
    return start, ops


def check_solution(problem: Problem, solution: str) -> int:
    """Index of the first wrong step of `solution` (its non-empty lines), or -1 if all are right.

    Step i < k (k = number of operations) must be the equation `r_i op_i n_i = r_{i+1}` with the
    true running values (addition may name its operands in either order); step k must state the
    answer (\\boxed{} or "The answer is"), and nothing may follow it. A solution that stops early
    gets the index one past its last step: that missing step is the first wrong one.
    """
    start, ops = problem_ops(problem)
    steps = split_steps(solution, "line")
    value = start
    for i, (op, operand) in enumerate(ops):
        if i >= len(steps):
            return len(steps)
        found = EQUATION.match(steps[i])
        if not found:
            return i
        left, sign, right, result = int(found.group(1)), found.group(2), int(found.group(3)), int(found.group(4))
        expected = apply_op(value, op, operand)
        operands_ok = (left, right) == (value, operand) or (op == "+" and (left, right) == (operand, value))
        if sign != op or not operands_ok or result != expected:
            return i
        value = expected
    k = len(ops)
    if k >= len(steps):
        return len(steps)
    if extract_answer(steps[k]) != str(value) or EQUATION.match(steps[k]):
        return k
    if len(steps) > k + 1:
        return k + 1
    return -1


ERROR_KINDS = ("carry", "other_result", "wrong_operands", "not_an_equation")


def first_error_kind(solution: str, first_wrong: int) -> str:
    """What went wrong at a solution's first wrong step (`check_solution`'s index): a result off by a
    multiple of 10 (a missed or spurious carry), a result off otherwise, the right result of the
    wrong operands, or a step that is not an equation (the answer line, a missing or extra step)."""
    steps = split_steps(solution, "line")
    found = EQUATION.match(steps[first_wrong]) if 0 <= first_wrong < len(steps) else None
    if not found:
        return "not_an_equation"
    left, sign, right, result = int(found.group(1)), found.group(2), int(found.group(3)), int(found.group(4))
    off = result - (left + right if sign == "+" else left - right)
    return "wrong_operands" if off == 0 else "carry" if off % 10 == 0 else "other_result"


def error_kind_counts(rows: list[dict]) -> dict[str, int]:
    """How many wrong rows of `greedy_eval` went wrong in each way at their first wrong step."""
    return {kind: sum(row.get("error_kind") == kind for row in rows if not row["correct"]) for kind in ERROR_KINDS}
