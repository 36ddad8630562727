"""Process-label data in the formats others use: TRL's stepwise records, Math-Shepherd, PRM800K.

The common record is TRL's "stepwise supervision" layout, `{prompt, completions, labels}`: one
solution as a list of steps, one label per step (bool for hard labels, float in [0, 1] for soft
ones), so data made here trains elsewhere and data from elsewhere trains here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from treetune.data.records import DataError, read_records, require

SHEPHERD_TAG = "ки"


def stepwise(prompt: str, completions: list[str], labels: list) -> dict:
    if len(completions) != len(labels):
        raise ValueError(f"{len(completions)} steps but {len(labels)} labels")
    return {"prompt": prompt, "completions": list(completions), "labels": list(labels)}


def from_math_shepherd(row: dict, where: str = "math-shepherd", line: int = 0) -> dict:
    """A Math-Shepherd row: `input` with the tag `ки` after every step, `label` the same text with
    each tag replaced by `+` or `-`. The question is the text before "Step 1:"."""
    text = require(row, "input", where, line)
    marked = require(row, "label", where, line)
    parts = text.split(SHEPHERD_TAG)
    labels, position = [], 0
    for part in parts[:-1]:
        position += len(part)
        if position >= len(marked) or marked[position] not in "+-":
            raise DataError(where, line, f"no +/- where the step tag stands (offset {position})", field="label")
        labels.append(marked[position] == "+")
        position += 1
    head, sep, first_step = parts[0].partition("Step 1:")
    if not sep:
        raise DataError(where, line, "no 'Step 1:' marks where the solution starts", field="input")
    steps = [sep + first_step] + parts[1:-1]
    return stepwise(head.strip(), [s.strip() for s in steps], labels)


def from_prm800k(row: dict, neutral_is_correct: bool = True, where: str = "prm800k", line: int = 0) -> dict:
    """A raw PRM800K row: the path the labeler followed (chosen completion, else the human one);
    where no completion was chosen, the first lowest-rated one ends the path. Rating 1 is correct,
    -1 wrong, 0 (neutral) as `neutral_is_correct` says."""
    question = require(row, "question", where, line, dict)
    steps_raw = require(require(row, "label", where, line, dict), "steps", where, line, list)
    completions, labels = [], []
    for step in steps_raw:
        chosen = step.get("chosen_completion")
        options = step.get("completions") or []
        if chosen is not None:
            pick = options[chosen]
        elif step.get("human_completion"):
            pick = dict(step["human_completion"], rating=step["human_completion"].get("rating") or 1)
        elif options:
            pick = min(options, key=lambda c: c.get("rating") if c.get("rating") is not None else 1)
        else:
            break
        rating = pick.get("rating")
        completions.append(pick["text"])
        labels.append(rating == 1 or (rating == 0 and neutral_is_correct) or rating is None)
        if chosen is None and not step.get("human_completion"):
            break  # the labeler stopped here
    if not completions:
        raise DataError(where, line, "no labelled step", field="label")
    return stepwise(require(question, "problem", where, line), completions, labels)


def read_stepwise(path: str | Path, fmt: str = "trl") -> list[dict]:
    """Stepwise records from a TRL-style, Math-Shepherd or PRM800K JSONL file."""
    def convert(row: dict, line: int) -> dict:
        if fmt == "trl":
            return stepwise(require(row, "prompt", path, line), require(row, "completions", path, line, list),
                            require(row, "labels", path, line, list))
        if fmt == "math_shepherd":
            return from_math_shepherd(row, str(path), line)
        if fmt == "prm800k":
            return from_prm800k(row, where=str(path), line=line)
        raise ValueError(f"unknown stepwise format {fmt!r}; expected trl, math_shepherd or prm800k")

    records, _ = read_records(path, convert)
    return records


def write_stepwise(records: Iterable[dict], path: str | Path) -> int:
    count = 0
    with Path(path).open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(stepwise(record["prompt"], record["completions"], record["labels"]), ensure_ascii=False) + "\n")
            count += 1
    return count
