"""Problem sources: GSM8K, MATH / MATH-500, arith, and any JSON/JSONL file given a field mapping.

Each source reads a local file when given `path` (the same files the hub serves) and otherwise
loads the hub dataset by name with `datasets`. Every row becomes a `Problem`; a row without a
question or a gold answer is an error naming the file, line and field.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treetune.data.answers import gsm8k_answer, last_boxed
from treetune.data.arith import arith_problems
from treetune.data.problem import Problem
from treetune.data.records import DataError, SkipReport, convert_rows, read_records, require

log = logging.getLogger(__name__)

GSM8K_HUB = ("openai/gsm8k", "main")
MATH500_HUB = "HuggingFaceH4/MATH-500"
MATH_HUB = "EleutherAI/hendrycks_math"
MATH_SUBJECT_CONFIGS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
    "number_theory", "prealgebra", "precalculus",
)
SOURCES = ("gsm8k", "math500", "math", "arith", "jsonl")


def gsm8k_row(row: Mapping[str, Any], index: int, split: str, where: str = "openai/gsm8k") -> Problem:
    """A GSM8K row {question, answer: "... #### N"} as a Problem; the answer comes from `#### N`."""
    question = require(row, "question", where, index)
    solution = require(row, "answer", where, index)
    answer = gsm8k_answer(solution)
    if answer is None:
        raise DataError(where, index, "no '#### <answer>' line", field="answer")
    return Problem(
        id=str(row.get("id", f"gsm8k-{split}-{index}")),
        question=question,
        answer=answer,
        solution=solution,
        source="gsm8k",
    )


def math_row(row: Mapping[str, Any], index: int, split: str, where: str = "MATH") -> Problem:
    """A MATH / MATH-500 row {problem, solution, [answer], level, subject|type, [unique_id]}."""
    question = require(row, "problem", where, index)
    solution = require(row, "solution", where, index)
    answer = row.get("answer")
    if answer in (None, ""):
        answer = last_boxed(solution)
        if answer is None:
            raise DataError(where, index, "no 'answer' field and no \\boxed{} in the solution", field="answer")
    level = row.get("level")
    if isinstance(level, str) and level.startswith("Level "):  # the full MATH release says "Level 3"
        level = int(level.split()[1]) if level.split()[1].isdigit() else level
    extra = {"level": level, "subject": row.get("subject", row.get("type"))}
    return Problem(
        id=str(row.get("unique_id", f"math-{split}-{index}")),
        question=question,
        answer=str(answer),
        solution=solution,
        source="math",
        extra={k: v for k, v in extra.items() if v is not None},
    )


def mapped_row(row: Mapping[str, Any], index: int, where: str, fields: Mapping[str, str], answer_from: str | None) -> Problem:
    """A row of any JSON/JSONL file, read through a field mapping {our name: their name}."""
    def take(ours: str, required: bool) -> Any:
        theirs = fields.get(ours, ours)
        if required:
            return require(row, theirs, where, index, (str, int, float))
        return row.get(theirs)

    question = take("question", True)
    solution = take("solution", False)
    answer = take("answer", answer_from is None)
    if answer_from is not None and answer in (None, ""):
        if solution is None:
            raise DataError(where, index, "missing (needed to find the answer)", field=fields.get("solution", "solution"))
        finder = {"boxed": last_boxed, "gsm8k": gsm8k_answer}[answer_from]
        answer = finder(solution)
        if answer is None:
            raise DataError(where, index, f"no {answer_from} answer in the solution", field=fields.get("solution", "solution"))
    used = {fields.get(k, k) for k in ("id", "question", "answer", "solution")}
    return Problem(
        id=str(take("id", False) or f"{Path(where).stem}-{index}"),
        question=str(question),
        answer=str(answer),
        solution=solution,
        source=fields.get("source_name", "jsonl"),
        extra={k: v for k, v in row.items() if k not in used},
    )


def _from_hub(name: str, config: str | None, split: str) -> Iterable[Mapping[str, Any]]:
    import datasets

    return datasets.load_dataset(name, config, split=split)


def load_problems(
    source: str,
    split: str = "test",
    path: str | Path | None = None,
    limit: int | None = None,
    *,
    fields: Mapping[str, str] | None = None,
    answer_from: str | None = None,
    skip_bad: bool = False,
    seed: int = 0,
) -> list[Problem]:
    """Load problems from `source`: gsm8k, math500, math, arith, or jsonl (with `path`).

    With `path`, the local JSON/JSONL file is read (GSM8K and MATH layouts, or any layout through
    `fields`, a mapping from question/answer/solution/id to the file's names, and `answer_from`
    = "boxed" or "gsm8k" to take the answer out of the solution). Without it, the hub dataset is
    loaded by name. `skip_bad` leaves malformed rows out and logs how many and why; otherwise the
    first one raises `DataError`.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown problem source {source!r}; expected one of {', '.join(SOURCES)}")
    if source == "arith":

        return arith_problems(split, limit=limit, seed=seed)

    report = SkipReport()
    if path is not None:
        where = str(path)
        if source == "gsm8k" and not fields:
            convert = lambda row, line: gsm8k_row(row, line, split, where)  # noqa: E731
        elif source in ("math", "math500") and not fields:
            convert = lambda row, line: math_row(row, line, split, where)  # noqa: E731
        else:
            convert = lambda row, line: mapped_row(row, line, where, fields or {}, answer_from)  # noqa: E731
        problems, report = read_records(path, convert, skip_bad=skip_bad, limit=limit)
    elif source == "gsm8k":
        rows = _from_hub(*GSM8K_HUB, split=split)
        problems, _ = convert_rows(enumerate(rows, 1), lambda r, i: gsm8k_row(r, i, split), GSM8K_HUB[0], skip_bad, limit, report)
    elif source == "math500":
        rows = _from_hub(MATH500_HUB, None, split="test")
        problems, _ = convert_rows(enumerate(rows, 1), lambda r, i: math_row(r, i, "test", MATH500_HUB), MATH500_HUB, skip_bad, limit, report)
    elif source == "math":
        problems = []
        for config in MATH_SUBJECT_CONFIGS:
            rows = _from_hub(MATH_HUB, config, split=split)
            remaining = None if limit is None else limit - len(problems)
            if remaining == 0:
                break
            convert = lambda r, i, c=config: math_row(r, i, f"{split}-{c}", f"{MATH_HUB}/{c}")  # noqa: E731
            problems += convert_rows(enumerate(rows, 1), convert, f"{MATH_HUB}/{config}", skip_bad, remaining, report)[0]
    else:
        raise ValueError("source 'jsonl' needs a path")
    if report.skipped:
        log.warning("%s: %s", path or source, report.summary())
    return problems


@dataclass
class ProblemArgs:
    """Which problems a job reads: the recipe part every job and trainer shares."""

    source: str = field(default="arith", metadata={"help": "Problem source: " + ", ".join(SOURCES) + "."})
    split: str = field(default="test", metadata={"help": "Split to read: train, test (or validation for arith)."})
    data_path: str | None = field(default=None, metadata={
        "help": "A local JSON/JSONL file in the source's layout (the same rows the hub serves); empty loads the "
                "hub dataset by name."})
    limit: int | None = field(default=None, metadata={"help": "Read only the first N problems; empty reads all."})
    problem_seed: int = field(default=0, metadata={"help": "Generator seed of the arith source (other sources ignore it)."})

    def load(self) -> list[Problem]:
        return load_problems(self.source, self.split, path=self.data_path, limit=self.limit, seed=self.problem_seed)
