"""The exact arith step checker as a step scorer (the protocol: `treetune.rollouts.scoring`): the
ground truth on the proving ground, and GroundedPRM's tool there."""

from __future__ import annotations

from collections.abc import Sequence

from treetune.data import Problem
from treetune.data.arith import check_solution

# the protocol's names at their old import path, for one release
from treetune.rollouts.scoring import AGGREGATIONS, StepScorer, aggregate, score_tree_leaves  # noqa: F401


class ArithCheckerScorer:
    """1 for the steps before the first wrong one, 0 from it on."""

    name = "arith_checker"

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for question, steps in zip(problems, solutions):
            problem = Problem(id="", question=question, answer="", source="arith")
            first_wrong = check_solution(problem, "\n".join(steps))
            out.append([1.0 if first_wrong == -1 or i < first_wrong else 0.0 for i in range(len(steps))])
        return out
