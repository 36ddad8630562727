"""Outcome reward: every finished trajectory of a tree graded against the gold answer."""

from __future__ import annotations

from collections.abc import Sequence

from treetune.data.answers import extract_answer
from treetune.rewards.grading import Grader, default_grader
from treetune.rollouts.tree import ReasoningTree


def score_outcomes(trees: Sequence[ReasoningTree], grader: Grader | None = None, key: str = "outcome") -> None:
    """Set `leaf.scores[key]` to 1.0 or 0.0 for every finished leaf (and `answer` to its extracted
    final answer), grading all leaves of all trees in one batch."""
    grader = grader or default_grader()
    leaves = [(tree, leaf, tree.path_text(leaf.id)) for tree in trees for leaf in tree.leaves()]
    verdicts = grader.grade_many([text for _, _, text in leaves], [tree.answer for tree, _, _ in leaves])
    for (_, leaf, text), ok in zip(leaves, verdicts):
        leaf.scores[key] = 1.0 if ok else 0.0
        leaf.scores["answer"] = extract_answer(text)
