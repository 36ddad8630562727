"""ProcessBench-style evaluation of step scorers (the official protocol).

A solution's predicted first wrong step is the first step whose score falls below the threshold
(-1 when none does). Per split: accuracy on erroneous solutions (exact index match), accuracy on
correct ones (predicting -1), and F1 = their harmonic mean; papers report the unweighted mean of
the splits' F1. A threshold sweep shows how the choice moves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from treetune.data.records import DataError, read_records, require


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
