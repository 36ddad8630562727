"""The step-scorer interface: (problem, steps of each path) -> one score in [0, 1] per step.

Discriminative PRMs, ThinkPRM, GroundedPRM and the exact arith checker all implement it, so
best-of-N selectors, beam search, MCTS values and Step-DPO error localisation can use any of them.
Path scores come from step scores by an aggregation: last, min, product or mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from treetune.data import Problem
from treetune.data.arith import check_solution
from treetune.data.steps import split_steps
from treetune.rollouts.tree import ReasoningTree


class StepScorer(Protocol):
    name: str

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
        """For each (problem text, list of steps), one score in [0, 1] per step."""
        ...


AGGREGATIONS = {
    "last": lambda s: s[-1],
    "min": min,
    "product": lambda s: math.prod(s),
    "mean": lambda s: sum(s) / len(s),
}


def aggregate(step_scores: Sequence[float], how: str = "last") -> float:
    """One path score from its step scores; an empty path scores 0."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")
    return float(AGGREGATIONS[how](list(step_scores))) if step_scores else 0.0


class ArithCheckerScorer:
    """The exact arith step checker as a step scorer: 1 for the steps before the first wrong one,
    0 from it on. The ground truth on the proving ground, and GroundedPRM's tool there."""

    name = "arith_checker"

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:

        out = []
        for question, steps in zip(problems, solutions):
            problem = Problem(id="", question=question, answer="", source="arith")
            first_wrong = check_solution(problem, "\n".join(steps))
            out.append([1.0 if first_wrong == -1 or i < first_wrong else 0.0 for i in range(len(steps))])
        return out


def score_tree_leaves(trees: Sequence[ReasoningTree], scorer: StepScorer, key: str | None = None,
                      step_mode: str = "line") -> None:
    """Write each finished leaf's step scores to `leaf.scores[key]` (a list, one per step of its
    path text split by `step_mode`), scoring all leaves of all trees in one call."""
    key = key or scorer.name
    jobs = [(leaf, tree.problem.get("question", tree.prompt), split_steps(tree.path_text(leaf.id), step_mode))
            for tree in trees for leaf in tree.leaves()]
    scores = scorer.score([q for _, q, _ in jobs], [s for _, _, s in jobs])
    for (leaf, _, _), values in zip(jobs, scores):
        leaf.scores[key] = [float(v) for v in values]
