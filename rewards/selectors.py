"""Best-of-N selectors: given a problem's candidate solutions, which one to answer with.

A selector is a function (candidates) -> index of the chosen candidate, or None when it cannot
choose. Selectors register by name (`@register("name")`), so later scorers (PRM aggregations,
weighted majority, ThinkPRM, RPC) plug into `launch/best_of_n.py` with `--selectors name,...`.
Candidates carry their equivalence class (answers equal under math-verify share a class), so
voting counts values, not strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import comb
from typing import Any


@dataclass
class Candidate:
    text: str
    answer: str | None
    correct: bool
    answer_class: int | None  # candidates whose answers are equal share a class; None: no answer
    tokens: int = 0
    logprob_mean: float | None = None
    scores: dict[str, Any] = field(default_factory=dict)


Selector = Callable[[Sequence[Candidate]], "int | None"]
SELECTORS: dict[str, Selector] = {}


def register(name: str) -> Callable[[Selector], Selector]:
    def add(selector: Selector) -> Selector:
        if name in SELECTORS:
            raise ValueError(f"a selector named {name!r} is already registered")
        SELECTORS[name] = selector
        return selector
    return add


def get_selector(name: str) -> Selector:
    if name not in SELECTORS:
        raise KeyError(f"unknown selector {name!r}; registered: {', '.join(sorted(SELECTORS))}")
    return SELECTORS[name]


@register("first")
def first(candidates: Sequence[Candidate]) -> int | None:
    """The first sample: what a single sample (N = 1 greedy-free decoding) would answer."""
    return 0 if candidates else None


def class_vote(candidates: Sequence[Candidate], weight: Callable[[Candidate], float]) -> int | None:
    """The first candidate of the answer class with the largest total weight (ties: first seen)."""
    totals: dict[int, float] = {}
    first_of: dict[int, int] = {}
    for i, c in enumerate(candidates):
        if c.answer_class is None:
            continue
        totals[c.answer_class] = totals.get(c.answer_class, 0.0) + weight(c)
        first_of.setdefault(c.answer_class, i)
    if not totals:
        return None
    best = max(totals, key=lambda k: (totals[k], -first_of[k]))
    return first_of[best]


@register("majority")
def majority(candidates: Sequence[Candidate]) -> int | None:
    """Self-consistency: the most frequent answer (by math-verify equivalence class)."""
    return class_vote(candidates, lambda c: 1.0)


@register("max_logprob")
def max_logprob(candidates: Sequence[Candidate]) -> int | None:
    """The candidate the policy itself finds likeliest (mean token log-prob)."""
    scored = [(c.logprob_mean, -i) for i, c in enumerate(candidates) if c.logprob_mean is not None]
    return -max(scored)[1] if scored else None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Codex)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _prm_selector(how: str) -> Selector:
    def select(candidates: Sequence[Candidate]) -> int | None:
        from .step_scorer import aggregate

        scored = [(aggregate(c.scores["prm"], how), -i) for i, c in enumerate(candidates) if c.scores.get("prm")]
        return -max(scored)[1] if scored else None

    select.__doc__ = f"The candidate with the best PRM score, steps aggregated by {how}."
    return select


for _how in ("last", "min", "product"):
    register(f"prm_{_how}")(_prm_selector(_how))
