"""The arith proving ground: splits, determinism, and the exact step checker."""

from __future__ import annotations

import random

import pytest
from treetune.data import Problem, load_problems
from treetune.data.arith import arith_problems, check_solution, first_error_kind, problem_ops
from treetune.data.steps import split_steps
from treetune.rewards.grading import grade


@pytest.fixture(scope="module")
def test_set():
    return arith_problems("test", 500)


def test_splits_never_share_a_question(test_set):
    train = {p.question for p in arith_problems("train", 20_000)}
    validation = {p.question for p in arith_problems("validation", 500)}
    test = {p.question for p in test_set}
    assert len(test) == 500 and len(validation) == 500
    assert not (train & test) and not (train & validation) and not (validation & test)


def test_generation_is_deterministic_and_prefix_stable(test_set):
    again = arith_problems("test", 200)
    assert [p.to_dict() for p in again] == [p.to_dict() for p in test_set[:200]]
    assert load_problems("arith", "test", limit=3)[0].question == test_set[0].question
    other_seed = arith_problems("test", 50, seed=1)
    assert [p.question for p in other_seed] != [p.question for p in test_set[:50]]


def test_problem_shape(test_set):
    steps = {p.extra["num_steps"] for p in test_set}
    assert steps == {2, 3, 4, 5}
    for p in test_set:
        lines = split_steps(p.solution, "line")
        assert len(lines) == p.extra["num_steps"] + 1
        assert lines[-1] == f"The answer is \\boxed{{{p.answer}}}"
        assert 0 <= int(p.answer) <= 40


def test_checker_accepts_every_gold_solution(test_set):
    assert all(check_solution(p, p.solution) == -1 for p in test_set)


def test_gold_answers_grade_correct_with_math_verify(test_set):
    from treetune.rewards.grading import grade_many

    assert all(grade_many([p.solution for p in test_set[:100]], [p.answer for p in test_set[:100]]))


def test_ops_parsed_back_from_the_text(test_set):
    for p in test_set[:100]:
        bare = Problem(id=p.id, question=p.question, answer=p.answer, source="arith")
        assert problem_ops(bare) == problem_ops(p)


def _corrupt(problem: Problem, rng: random.Random) -> tuple[str, int]:
    """A copy of the gold solution with one step broken, and that step's index."""
    lines = split_steps(problem.solution, "line")
    index = rng.randrange(len(lines))
    line = lines[index]
    kind = rng.choice(["result", "carry", "operand", "sign", "garble"]) if index < len(lines) - 1 else "answer"
    if kind in ("result", "carry", "operand"):
        left, rest = line.split("+" if "+" in line else "-", 1)
        sign = "+" if "+" in line else "-"
        right, result = rest.split("=")
        bump = rng.choice([-2, -1, 1, 2, 10])
        if kind == "result":
            result = str(int(result) + bump)
        elif kind == "carry":
            left = str(int(left) + bump)
        else:
            right = str(int(right) + bump)
        line = f"{left}{sign}{right}={result}"
    elif kind == "sign":
        line = line.replace("+", "#").replace("-", "+").replace("#", "-")
    elif kind == "garble":
        line = rng.choice(["so we add them", "12+=4", "", "The answer is \\boxed{3}."]) or "???"
    else:
        line = f"The answer is \\boxed{{{int(problem.answer) + rng.choice([-1, 1, 5])}}}."
    lines[index] = line
    return "\n".join(lines), index


def test_checker_finds_the_corrupted_step(test_set):
    rng = random.Random(7)
    checked = 0
    for problem in test_set:
        for _ in range(4):
            solution, index = _corrupt(problem, rng)
            if solution == problem.solution:
                continue
            assert check_solution(problem, solution) == index, (problem.question, solution)
            checked += 1
    assert checked > 1500


def test_checker_edge_cases():
    problem = arith_problems("test", 1)[0]
    lines = split_steps(problem.solution, "line")
    assert check_solution(problem, "") == 0
    assert check_solution(problem, "\n".join(lines[:2])) == 2  # stops early: the missing step is wrong
    assert check_solution(problem, problem.solution + "\nextra words") == len(lines)
    assert check_solution(problem, problem.solution.replace("=", " = ")) == -1  # spacing is fine
    start, ops = problem_ops(problem)
    if ops[0][0] == "+":  # addition may name its operands in either order
        swapped = f"{ops[0][1]}+{start}={start + ops[0][1]}"
        assert check_solution(problem, "\n".join([swapped] + lines[1:])) == -1
    assert grade(problem.solution, problem.answer)


def test_first_error_kind_names_what_went_wrong():
    problem = arith_problems("test", 1)[0]
    lines = split_steps(problem.solution, "line")
    start, ops = problem_ops(problem)
    op, n = ops[0]
    right = start + n if op == "+" else start - n

    def with_first(step: str) -> str:
        return "\n".join([step] + lines[1:])

    assert first_error_kind(with_first(f"{start}{op}{n}={right + 10}"), 0) == "carry"
    assert first_error_kind(with_first(f"{start}{op}{n}={right + 3}"), 0) == "other_result"
    assert first_error_kind(with_first(f"{start + 1}{op}{n}={right + 1}"), 0) == "wrong_operands"
    assert first_error_kind("\n".join(lines[:2]), 2) == "not_an_equation"  # stopped early: the step is missing
    solution = with_first(f"{start}{op}{n}={right + 10}")
    assert first_error_kind(solution, check_solution(problem, solution)) == "carry"
