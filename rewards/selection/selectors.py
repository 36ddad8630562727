"""Best-of-N selectors: given a problem's candidate solutions, which one to answer with.

A selector is a function (candidates) -> index of the chosen candidate, or None when it cannot
choose. Selectors register by name (`@register("name")`), so later scorers (PRM aggregations,
weighted majority, ThinkPRM, RPC) plug into `launch/best_of_n.py` with `--selectors name,...`.
Candidates carry their equivalence class (answers equal under math-verify share a class), so
voting counts values, not strings. Parametric names build a selector on request:
`weighted:<score key>[:<aggregation>]` is weighted majority over any scorer's scores.
A selector that shares credit among tied answers (as `rpc_reference` does) carries a `credit`
function; `selection_credit` scores any selector that way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import comb
from typing import Any

from treetune.rewards.scorers.arith_checker import AGGREGATIONS, aggregate
from treetune.rewards.selection import rpc_reference
from treetune.rewards.selection.rpc import rpc_weights


@dataclass
class Candidate:
    text: str
    answer: str | None
    correct: bool
    answer_class: int | None  # candidates whose answers are equal share a class; None: no answer
    tokens: int = 0
    logprob_mean: float | None = None
    logprob_sum: float | None = None  # log-probability of the whole completion (RPC's perplexity consistency)
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


def selection_credit(select: Selector, candidates: Sequence[Candidate]) -> float:
    """How right a selector's answer is: 1 or 0 for its pick, or the share of credit a selector
    with a `credit` function gives (right groups among tied winners)."""
    shared = getattr(select, "credit", None)
    if shared is not None:
        return float(shared(candidates))
    pick = select(candidates)
    return 1.0 if pick is not None and candidates[pick].correct else 0.0


# Parametric selectors: "family:arg:..." names built on request, e.g. "weighted:think_prm:min".
FAMILIES: dict[str, Callable[..., Selector]] = {}


def get_selector(name: str) -> Selector:
    if name in SELECTORS:
        return SELECTORS[name]
    family, _, rest = name.partition(":")
    if rest and family in FAMILIES:
        try:
            return FAMILIES[family](*rest.split(":"))
        except TypeError as error:
            raise KeyError(f"selector {name!r}: wrong arguments for {family}:... ({error})") from None
    raise KeyError(f"unknown selector {name!r}; registered: {', '.join(sorted(SELECTORS))}; "
                   f"families: {', '.join(f'{f}:...' for f in sorted(FAMILIES))}")


@register("first")
def first(candidates: Sequence[Candidate]) -> int | None:
    """The first sample: what a single sample (N = 1 greedy-free decoding) would answer."""
    return 0 if candidates else None


def class_vote(candidates: Sequence[Candidate], weight: Callable[[Candidate], float]) -> int | None:
    """The first candidate of the answer class with the largest total weight (ties: first seen)."""
    return class_vote_weights(candidates, [weight(c) for c in candidates])


def class_vote_weights(candidates: Sequence[Candidate], weights: Sequence[float]) -> int | None:
    """`class_vote` with the candidates' weights given as a list (for votes that depend on the others)."""
    totals: dict[int, float] = {}
    first_of: dict[int, int] = {}
    for i, (c, w) in enumerate(zip(candidates, weights, strict=True)):
        if c.answer_class is None:
            continue
        totals[c.answer_class] = totals.get(c.answer_class, 0.0) + w
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

        scored = [(aggregate(c.scores["prm"], how), -i) for i, c in enumerate(candidates) if c.scores.get("prm")]
        return -max(scored)[1] if scored else None

    select.__doc__ = f"The candidate with the best PRM score, steps aggregated by {how}."
    return select


for _how in ("last", "min", "product"):
    register(f"prm_{_how}")(_prm_selector(_how))


def weighted_majority(key: str, how: str = "last") -> Selector:
    """Weighted majority: the answer class with the largest sum of a scorer's scores (`scores[key]`,
    step-score lists aggregated by `how`); candidates without that score add 0."""

    if how not in AGGREGATIONS:
        raise KeyError(f"unknown aggregation {how!r} in weighted:{key}:{how}; expected one of {', '.join(AGGREGATIONS)}")

    def weight(c: Candidate) -> float | None:
        value = c.scores.get(key)
        if value is None or isinstance(value, (list, tuple)) and not value:
            return None
        return aggregate(value, how) if isinstance(value, (list, tuple)) else float(value)

    def select(candidates: Sequence[Candidate]) -> int | None:
        weights = [weight(c) for c in candidates]
        if all(w is None for w in weights):
            return None  # this scorer never ran: no vote rather than a silent plain majority
        return class_vote_weights(candidates, [0.0 if w is None else w for w in weights])

    select.__doc__ = f"Weighted majority over scores[{key!r}] (steps aggregated by {how})."
    return select


FAMILIES["weighted"] = weighted_majority
for _how in ("last", "min", "product"):
    register(f"weighted_prm_{_how}")(weighted_majority("prm", _how))


def consistency_selector(prune: bool, joint: bool) -> Selector:
    """treetune's perplexity consistency over the candidates that carry log-probs: `rpc` (two-start
    pruning, joint probabilities of distinct completions), `pc` (no pruning), `rpc_mean` (pruning,
    every path votes with its length-normalised probability). rewards/selection/rpc.py says why
    each is as it is; `rpc_reference` is the authors' own arithmetic."""

    def select(candidates: Sequence[Candidate]) -> int | None:

        usable = [i for i, c in enumerate(candidates)
                  if c.logprob_mean is not None and (not joint or c.logprob_sum is not None)]
        if not usable:
            return None
        votes = rpc_weights([candidates[i].logprob_mean for i in usable], [candidates[i].text for i in usable],
                            [candidates[i].logprob_sum for i in usable] if joint else None, prune=prune)
        weights = [0.0] * len(candidates)
        for i, v in zip(usable, votes):
            weights[i] = v
        return class_vote_weights(candidates, weights)

    select.__doc__ = {(True, True): "treetune's RPC: two-start Weibull pruning, then the joint probability mass of distinct completions.",
                      (False, True): "Perplexity consistency: joint probability mass of distinct completions, no pruning.",
                      (True, False): "Two-start pruning, then every kept path votes with its length-normalised probability.",
                      (False, False): "Length-normalised probability votes, no pruning."}[(prune, joint)]
    return select


register("rpc")(consistency_selector(prune=True, joint=True))
register("pc")(consistency_selector(prune=False, joint=True))
register("rpc_mean")(consistency_selector(prune=True, joint=False))


def _reference_choice(candidates: Sequence[Candidate]):
    """(the reference's choice, usable indices, group key per usable index) over candidates with log-probs."""
    usable = [i for i, c in enumerate(candidates) if c.logprob_mean is not None]
    groups = [candidates[i].answer_class if candidates[i].answer_class is not None else rpc_reference.NO_ANSWER
              for i in usable]
    choice = rpc_reference.choose(groups, [candidates[i].text for i in usable], [candidates[i].logprob_mean for i in usable])
    return choice, usable, groups


@register("rpc_reference")
def rpc_reference_select(candidates: Sequence[Candidate]) -> int | None:
    """RPC as the authors' code computes it (rewards/selection/rpc_reference.py: compute_rpc.py's
    wpc_evaluator): single-start Weibull pruning, exp(mean log-prob) summed over distinct texts.
    Picks the first candidate of the first tied winner; `credit` shares among the tied ones."""
    if not any(c.logprob_mean is not None for c in candidates):
        return None
    choice, usable, groups = _reference_choice(candidates)
    return usable[groups.index(choice.winners[0])]


def _rpc_reference_credit(candidates: Sequence[Candidate]) -> float:
    if not any(c.logprob_mean is not None for c in candidates):
        return 0.0
    choice, usable, groups = _reference_choice(candidates)
    right: dict = {}
    for i, g in zip(usable, groups):  # a group is right when its first path is (one answer class, one grade)
        right.setdefault(g, g != rpc_reference.NO_ANSWER and candidates[i].correct)
    return choice.credit(right)


rpc_reference_select.credit = _rpc_reference_credit
