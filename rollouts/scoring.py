"""The step-scorer protocol: (problem, steps of each path) -> one score in [0, 1] per step.

Discriminative PRMs, released PRMs (Qwen2.5-Math-PRM, Math-Shepherd), ThinkPRM, GroundedPRM and
its tool, the exact arith checker and MCTS self-evaluation all implement it (they live in
`treetune.rewards.scorers`, built by `load_scorer`), so best-of-N selectors, beam search, MCTS
values, Step-DPO error localisation and BVPO ranking can use any of them. A path's score comes
from its step scores by an aggregation: last, min, product or mean.

Rollouts never import rewards: a sampler takes its scorer injected, as a step scorer or as a
`PathValue` (one value per partial path). `ScorerArgs` is the part of a recipe that names the
scorer, the same three fields on every command line that takes one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from treetune.data.steps import SEPARATORS, split_steps, step_separator
from treetune.rollouts.tree import ReasoningTree


class StepScorer(Protocol):
    """One score in [0, 1] per step of each (problem text, steps) pair; `name` keys its scores."""

    name: str

    def score(self, problems: Sequence[str], solutions: Sequence[Sequence[str]]) -> list[list[float]]: ...


class PathValue(Protocol):
    """One value in [0, 1] for each partial path (problem text, its steps so far)."""

    def __call__(self, problems: Sequence[str], paths: Sequence[Sequence[str]]) -> list[float]: ...


AGGREGATIONS: dict[str, Callable[[list[float]], float]] = {
    "last": lambda s: s[-1],
    "min": min,
    "product": math.prod,
    "mean": lambda s: sum(s) / len(s),
}


def aggregate(step_scores: Sequence[float], how: str = "last") -> float:
    """One path score from its step scores; an empty path scores 0."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")
    return float(AGGREGATIONS[how](list(step_scores))) if step_scores else 0.0


class ScorerValue:
    """A step scorer read as a path value: its step scores aggregated (last, min, product, mean)."""

    def __init__(self, scorer: StepScorer, aggregation: str = "last"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")
        self.scorer, self.aggregation = scorer, aggregation
        self.name = getattr(scorer, "name", type(scorer).__name__)

    def __call__(self, problems: Sequence[str], paths: Sequence[Sequence[str]]) -> list[float]:
        if not paths:
            return []
        scores = self.scorer.score(list(problems), [list(p) for p in paths])
        return [aggregate(s, self.aggregation) for s in scores]


def as_path_value(scorer: StepScorer | PathValue | None, aggregation: str = "last") -> PathValue | None:
    """A path value for a sampler. A callable scorer is its own path value (self-evaluation judges
    the last step of the path it is given, which is its "last" aggregation at one call per path,
    not one per step); any other step scorer is wrapped by `ScorerValue`."""
    if scorer is None or callable(scorer):
        return scorer
    if not hasattr(scorer, "score"):
        raise TypeError(f"{type(scorer).__name__} is neither a step scorer (.score) nor a path value (callable)")
    return ScorerValue(scorer, aggregation)


def score_tree_leaves(trees: Sequence[ReasoningTree], scorer: StepScorer, key: str | None = None,
                      step_mode: str = "line") -> None:
    """Write each finished leaf's step scores to `leaf.scores[key]` (a list, one per step of its
    path text split by `step_mode`), scoring all leaves of all trees in one call."""
    key = key or scorer.name
    jobs = [(leaf, tree.problem.get("question", tree.prompt), split_steps(tree.path_text(leaf.id), step_mode))
            for tree in trees for leaf in tree.leaves()]
    scores = scorer.score([q for _, q, _ in jobs], [s for _, _, s in jobs]) if jobs else []
    for (leaf, _, _), values in zip(jobs, scores):
        leaf.scores[key] = [float(v) for v in values]


# -- the recipe part ---------------------------------------------------------------------------
def next_part_checks(part: type, args) -> None:
    """Run the `__post_init__` of the recipe part after `part` in `args`' MRO: a job's Args composed
    of several parts (`class RolloutArgs(ScorerArgs, SearchArgs, ...)`) gets every part's checks."""
    after = getattr(super(part, args), "__post_init__", None)
    if after is not None:
        after()


NAMED_SCORERS = ("arith_checker", "tool", "self_eval")
SCORER_FORMATS = ("treetune", "qwen", "shepherd", "thinkprm", "grounded_gen")
STEP_MODES = tuple(SEPARATORS)


@dataclass
class ScorerArgs:
    """Which step scorer a job uses and how solutions split into its steps (`load_scorer` builds it)."""

    formats: ClassVar[tuple[str, ...]] = SCORER_FORMATS

    scorer: str | None = field(default=None, metadata={
        "help": "The step scorer: arith_checker (the exact arith step checker), tool (GroundedPRM's sandboxed "
                "equation checker), self_eval (the policy judging its own last step), or a PRM folder / hub name "
                "read as --scorer_format says; empty: none."})
    scorer_format: str = field(default="treetune", metadata={
        "help": "How a PRM folder is read: treetune (launch/train_prm.py's separator head, with its fusion file "
                "if any), qwen (Qwen2.5-Math-PRM), shepherd (Math-Shepherd), thinkprm (ThinkPRM, a generative "
                "verifier on vLLM), grounded_gen (the generative GroundedPRM)."})
    step_mode: str = field(default="line", metadata={
        "help": "How a solution splits into steps: line (one a line: arith, GSM8K), blank_line (MATH-style "
                "paragraphs) or step_k ('Step k:' markers); also the separator a treetune PRM reads after each step."})

    def __post_init__(self) -> None:
        if self.scorer is not None and self.scorer.strip().lower() in ("", "none"):
            self.scorer = None
        if self.scorer_format not in self.formats:
            raise ValueError(f"field 'scorer_format': unknown format {self.scorer_format!r}; expected one of "
                             f"{', '.join(self.formats)}")
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"field 'step_mode': unknown step mode {self.step_mode!r}; expected one of "
                             f"{', '.join(STEP_MODES)}")
        next_part_checks(ScorerArgs, self)

    @property
    def separator(self) -> str:
        """The text between two steps under `step_mode` (`treetune.data.steps`)."""
        return step_separator(self.step_mode)
