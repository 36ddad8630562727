"""Reward functions in TRL's form (`f(prompts, completions, **columns) -> list[float]`) over tree
leaves: the rollout hands every row its leaf's full text (`text`) and the problem's gold answer
(`answer`), so grading never re-decodes token ids."""

from __future__ import annotations

from collections.abc import Sequence

from treetune.data.steps import split_steps
from treetune.rewards.grading import Grader
from treetune.rollouts.scoring import aggregate


class OutcomeReward:
    """1.0 when math-verify finds the leaf's final answer equal to the gold answer, else 0.0."""

    __name__ = "outcome"

    def __init__(self, grader: Grader | None = None):
        self.grader = grader or Grader()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], text: Sequence[str],
                 answer: Sequence[str], **_) -> list[float]:
        return [1.0 if ok else 0.0 for ok in self.grader.grade_many(list(text), list(answer))]

    def close(self) -> None:
        self.grader.close()


class StepScorerReward:
    """Any treetune step scorer (a PRM, GroundedPRM's tool, the arith checker, ThinkPRM) as a reward:
    the leaf's step scores aggregated (min by default: a path is as good as its worst step)."""

    def __init__(self, scorer, step_mode: str = "line", aggregation: str = "min"):
        self.scorer, self.step_mode, self.aggregation = scorer, step_mode, aggregation
        self.__name__ = f"scorer_{getattr(scorer, 'name', type(scorer).__name__)}"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], text: Sequence[str],
                 question: Sequence[str], **_) -> list[float]:
        steps = [split_steps(t, self.step_mode) for t in text]
        scores = self.scorer.score(list(question), steps)
        return [aggregate(s, self.aggregation) for s in scores]
