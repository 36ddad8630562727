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

from treetune.data.problem import Problem

NAMES = ("Mia", "Tom", "Ana", "Ben", "Eva", "Sam", "Lea", "Max", "Zoe", "Leo", "Ivy", "Dan")
PRONOUNS = {"Mia": "She", "Ana": "She", "Eva": "She", "Lea": "She", "Zoe": "She", "Ivy": "She"}
ITEMS = ("apples", "pens", "cards", "coins", "books", "shells", "stamps", "marbles")
PHRASES = {
    "+": ("{P} gets {n} more.", "{P} buys {n} more.", "{P} finds {n} more."),
    "-": ("{P} gives away {n}.", "{P} loses {n}.", "{P} sells {n}."),
}
EQUATION = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*(\d+)\s*\.?\s*$")
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


def apply_op(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand


def gold_solution(start: int, ops: list[tuple[str, int]]) -> tuple[str, int]:
    """The gold solution text (one equation a line, then the boxed answer) and the answer."""
    lines, value = [], start
    for op, operand in ops:
        result = apply_op(value, op, operand)
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
