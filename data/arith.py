"""The `arith` proving ground: multi-step arithmetic word problems with an exact step checker.

A problem is a short story of 2 to 5 additions and subtractions on small numbers:

    Mia has 7 pens. She gets 5 more. She gives away 3. How many pens does Mia have now?

and its gold solution is one equation a line, ending in the usual boxed answer:

    7+5=12
    12-3=9
    The answer is \\boxed{9}

`check_solution` reads any model-written solution and returns the index of its first wrong step
(wrong arithmetic, a wrong number carried over or taken from the story, a malformed or missing
step, a wrong final answer), or -1 when every step is right: exact process labels, the ground
truth for PRM evaluation. Problems are generated from a seed; the split a problem belongs to is
decided by a hash of its text, so train, validation and test never share a question.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from .problem import Problem
from .steps import split_steps

NAMES = ("Mia", "Tom", "Ana", "Ben", "Eva", "Sam", "Lea", "Max", "Zoe", "Leo", "Ivy", "Dan")
PRONOUNS = {"Mia": "She", "Ana": "She", "Eva": "She", "Lea": "She", "Zoe": "She", "Ivy": "She"}
ITEMS = ("apples", "pens", "cards", "coins", "books", "shells", "stamps", "marbles")
PHRASES = {
    "+": ("{P} gets {n} more.", "{P} buys {n} more.", "{P} finds {n} more."),
    "-": ("{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}."),
}
_EQUATION = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*(\d+)\s*\.?\s*$")
SPLITS = ("train", "validation", "test")
GENERATOR_VERSION = 2  # bump when the generator's output changes: cached tiny policies are rebuilt
DEFAULT_SIZES = {"train": 50_000, "validation": 1_000, "test": 1_000}


@dataclass(frozen=True)
class ArithSpec:
    """The size of the world: how many steps and how large the numbers get."""

    min_steps: int = 2
    max_steps: int = 5
    max_start: int = 20
    max_operand: int = 9
    max_value: int = 40


def split_of(question: str) -> str:
    """Which split a question belongs to, from a hash of its text: 5% test, 5% validation, 90% train."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def make_problem(rng: random.Random, spec: ArithSpec = ArithSpec()) -> tuple[str, int, list[tuple[str, int]]]:
    """One random story: (question, start value, [(op, operand), ...])."""
    name = rng.choice(NAMES)
    pronoun = PRONOUNS.get(name, "He")
    item = rng.choice(ITEMS)
    value = start = rng.randint(1, spec.max_start)
    ops: list[tuple[str, int]] = []
    sentences = [f"{name} has {start} {item}."]
    for _ in range(rng.randint(spec.min_steps, spec.max_steps)):
        can_add = value + 1 <= spec.max_value
        op = "-" if not can_add or (value > 1 and rng.random() < 0.5) else "+"
        high = min(spec.max_operand, value - 1 if op == "-" else spec.max_value - value)
        operand = rng.randint(1, max(1, high))
        value = value + operand if op == "+" else value - operand
        ops.append((op, operand))
        sentences.append(rng.choice(PHRASES[op]).format(P=pronoun, n=operand))
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), start, ops


def _apply(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand


def gold_solution(start: int, ops: list[tuple[str, int]]) -> tuple[str, int]:
    """The gold solution text (one equation a line, then the boxed answer) and the answer."""
    lines, value = [], start
    for op, operand in ops:
        result = _apply(value, op, operand)
        lines.append(f"{value}{op}{operand}={result}")
        value = result
    lines.append(f"The answer is \\boxed{{{value}}}")
    return "\n".join(lines), value


def arith_problems(split: str = "test", limit: int | None = None, seed: int = 0, spec: ArithSpec = ArithSpec()) -> list[Problem]:
    """The first `limit` problems of `split` drawn from the generator seeded with `seed`.

    The same (split, seed, spec) always gives the same list, and a longer list starts with the
    shorter one. Duplicated questions are dropped, so every problem is distinct.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown arith split {split!r}; expected one of {', '.join(SPLITS)}")
    count = DEFAULT_SIZES[split] if limit is None else limit
    rng = random.Random(f"arith-{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < count:
        question, start, ops = make_problem(rng, spec)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        solution, answer = gold_solution(start, ops)
        out.append(Problem(
            id=f"arith-{split}-{len(out)}",
            question=question,
            answer=str(answer),
            solution=solution,
            source="arith",
            extra={"start": start, "ops": [[op, n] for op, n in ops], "num_steps": len(ops)},
        ))
    return out


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
    from .answers import extract_answer

    start, ops = problem_ops(problem)
    steps = split_steps(solution, "line")
    value = start
    for i, (op, operand) in enumerate(ops):
        if i >= len(steps):
            return len(steps)
        found = _EQUATION.match(steps[i])
        if not found:
            return i
        left, sign, right, result = int(found.group(1)), found.group(2), int(found.group(3)), int(found.group(4))
        expected = _apply(value, op, operand)
        operands_ok = (left, right) == (value, operand) or (op == "+" and (left, right) == (operand, value))
        if sign != op or not operands_ok or result != expected:
            return i
        value = expected
    k = len(ops)
    if k >= len(steps):
        return len(steps)
    if extract_answer(steps[k]) != str(value) or _EQUATION.match(steps[k]):
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
    found = _EQUATION.match(steps[first_wrong]) if 0 <= first_wrong < len(steps) else None
    if not found:
        return "not_an_equation"
    left, sign, right, result = int(found.group(1)), found.group(2), int(found.group(3)), int(found.group(4))
    off = result - (left + right if sign == "+" else left - right)
    return "wrong_operands" if off == 0 else "carry" if off % 10 == 0 else "other_result"


def error_kind_counts(rows: list[dict]) -> dict[str, int]:
    """How many wrong rows of `greedy_eval` went wrong in each way at their first wrong step."""
    return {kind: sum(row.get("error_kind") == kind for row in rows if not row["correct"]) for kind in ERROR_KINDS}


def tiny_policy(cache_dir: str | None = None) -> str:
    """Local path of the tiny arith policy (a Qwen2 model vLLM loads), built on first call and cached.

    The one place where `data` reaches up into `trainers`: the policy is made by the SFT recipe,
    and this name is where users and every launch script look for it.
    """
    from treetune.trainers.tiny_policy import tiny_policy as build_or_reuse

    return build_or_reuse(cache_dir)
