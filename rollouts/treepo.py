"""TreePO segment trees: fixed-length segments, branching at segment boundaries, budget transfer,
early stop and depth-first fallback (TreePO, arXiv 2508.17445, and its public code).

Per problem the tree may hold at most `trajectories` finished paths (w). Every step, each live
path gets between 1 and `branch` (b) children, the total being min(w - finished, b x live) so
the budget of paths that finished early moves to those still alive ("branching budget
transfer"). The split over live paths is even (TreePO's default `fixed_avg`) or follows the
paths' mean token log-probs through a softmax with a temperature, favouring low- or
high-probability paths. When a problem has no live path left but fewer than w trajectories, a
finished path (preferably one that ended with EOS or a boxed answer) is cut back at a random
segment boundary and re-forked there ("fallback"), so the new branches share its prefix.
With `fork="coupled"` the fork points are not fixed: see treepo_coupled.py (this repo's addition,
not in the paper), which keeps the w trajectories independent while sharing their common prefixes.

All live paths of all problems at one depth go to the engine as one batch, ordered by problem
and path so that requests with shared prefixes sit together; siblings are one request with n
children, so the prefix is sent once.

Choices where the paper and code differ: the code checks for a boxed answer in the new segment
only; here the whole path is checked, since an answer can straddle a segment boundary. The code's
budget formula adds 2 x (paths finished this step); here the budget is simply what is left of
w, which gives the same transfer without overshooting w.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from treetune.rollouts.engines import Engine
from treetune.rollouts.stopping import finish_reason_for, request_seed
from treetune.rollouts.tree import ReasoningTree
from treetune.rollouts.treepo_coupled import grow_coupled, segment_request


@dataclass
class TreePOSettings:
    trajectories: int = 16  # w: finished paths per problem
    segment_tokens: int = 8  # l: tokens per segment (a node)
    max_depth: int = 16
    max_response_tokens: int = 256
    branch: int = 2  # b: children per live path per step, at most
    init_divergence: int = 2  # children of the root ...
    init_divergence_max: int | None = None  # ... or a random number in [init_divergence, this]
    budget: str = "even"  # "even" | "logprob"
    logprob_temperature: float = 2.0
    favour: str = "low"  # with budget="logprob": more branches to "low" or "high" probability paths
    stop_on_boxed: bool = True
    repetition_window: int = 32
    repetition_count: int = 8
    fallback: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    # "fixed": fork b ways every `segment_tokens` (TreePO). "coupled": fork exactly where independent
    # samples would leave a shared probe, so the w leaves are iid like flat sampling's (treepo_coupled.py)
    fork: str = "fixed"
    coupled_top_k: int = 8  # coupled: top log-probs per position, to draw the token a leaving sample takes

    def __post_init__(self) -> None:
        if self.budget not in ("even", "logprob"):
            raise ValueError(f"budget must be 'even' or 'logprob', not {self.budget!r}")
        if self.favour not in ("low", "high"):
            raise ValueError(f"favour must be 'low' or 'high', not {self.favour!r}")
        if self.fork not in ("fixed", "coupled"):
            raise ValueError(f"fork must be 'fixed' or 'coupled', not {self.fork!r}")
        if self.fork == "coupled" and self.coupled_top_k < 2:
            raise ValueError("fork='coupled' needs coupled_top_k >= 2 (the probe's token and another)")
        if self.branch < 1 or self.trajectories < 1 or self.segment_tokens < 1:
            raise ValueError("branch, trajectories and segment_tokens must be at least 1")


def split_budget(total: int, weights: Sequence[float], cap: int) -> list[int]:
    """`total` branches over paths: at least 1 and at most `cap` each, the rest by weight
    (largest remainder). Needs len(weights) <= total <= cap * len(weights)."""
    n = len(weights)
    counts = [1] * n
    extra = total - n
    while extra > 0:
        open_ = [i for i in range(n) if counts[i] < cap]
        mass = sum(weights[i] for i in open_) or float(len(open_))
        shares = {i: extra * ((weights[i] / mass) if mass else 1 / len(open_)) for i in open_}
        given = 0
        for i in open_:
            add = min(cap - counts[i], int(math.floor(shares[i])))
            counts[i] += add
            given += add
        rest = extra - given
        by_remainder = sorted(open_, key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
        for i in by_remainder:
            if rest == 0:
                break
            if counts[i] < cap:
                counts[i] += 1
                rest -= 1
        extra = rest
    return counts


@dataclass
class _State:
    tree: ReasoningTree
    rng: random.Random
    live: list[int] = field(default_factory=list)  # nodes waiting to be extended
    forks: dict[int, int] = field(default_factory=dict)  # node -> children to sample this step
    finished: int = 0
    fallbacks: int = 0

    @property
    def done(self) -> bool:
        return not self.live and not self.forks


class TreePOSampler:
    name = "treepo"

    def __init__(self, settings: TreePOSettings = TreePOSettings()):
        self.settings = settings

    # -- budget -------------------------------------------------------------------------------
    def _path_score(self, tree: ReasoningTree, node_id: int) -> float:
        logprobs = tree.path_logprobs(node_id)
        return sum(logprobs) / len(logprobs) if logprobs else 0.0

    def _allocate(self, state: _State) -> None:
        s = self.settings
        live = state.live
        if not live:
            return
        total = max(len(live), min(s.trajectories - state.finished, s.branch * len(live)))
        if s.budget == "even":
            weights = [1.0] * len(live)
        else:
            sign = -1.0 if s.favour == "low" else 1.0
            logits = [sign * self._path_score(state.tree, i) / s.logprob_temperature for i in live]
            weights = [math.exp(x - max(logits)) for x in logits]  # softmax, shifted for stability
        for node_id, count in zip(live, split_budget(total, weights, s.branch)):
            state.forks[node_id] = count
        state.live = []

    def _fall_back(self, state: _State) -> bool:
        """Re-fork a finished path at a random segment boundary; False if nothing to fork from."""
        s = self.settings
        leaves = state.tree.leaves()
        preferred = [n for n in leaves if n.finish_reason in ("boxed", "eos")] or leaves
        if not preferred:
            return False
        leaf = state.rng.choice(preferred)
        path = state.tree.path(leaf.id)
        cut = state.rng.randrange(len(path))  # keep path[:cut]; 0 means fork from the root
        node_id = path[cut - 1].id if cut > 0 else 0
        state.forks[node_id] = state.forks.get(node_id, 0) + min(s.branch, s.trajectories - state.finished)
        state.fallbacks += 1
        return True

    # -- growing ------------------------------------------------------------------------------
    def grow(self, engine: Engine, trees: Sequence[ReasoningTree], progress: bool = False) -> Iterator[ReasoningTree]:
        """Grow every tree to its trajectory budget; yields each tree as soon as it is finished."""
        s = self.settings
        if s.fork == "coupled":
            for tree in trees:
                tree.sampler = {"name": self.name, **asdict(s)}
            yield from grow_coupled(s, engine, trees)
            return
        states = []
        for tree in trees:
            rng = random.Random(request_seed(s.seed, tree.problem_id, -1))
            init = s.init_divergence if s.init_divergence_max is None else rng.randint(s.init_divergence, s.init_divergence_max)
            tree.sampler = {"name": self.name, **asdict(s)}
            states.append(_State(tree=tree, rng=rng, forks={0: max(1, min(init, s.trajectories))}))
        step = 0
        while states:
            batch: list[tuple[_State, int, int]] = []
            for state in states:
                if not state.forks:
                    self._allocate(state)
                batch += [(state, node_id, count) for node_id, count in sorted(state.forks.items())]
                state.forks = {}
            requests = [segment_request(s, state.tree, node_id, count, step) for state, node_id, count in batch]
            results = engine.generate(requests, progress=False)
            step += 1
            for (state, parent, _), result in zip(batch, results):
                tree = state.tree
                parent_text = tree.path_text(parent)
                parent_tokens = len(tree.path_token_ids(parent))
                for c in result.completions:
                    depth = tree.nodes[parent].depth + 1
                    reason = finish_reason_for(
                        parent_text + c.text, c.text, c.finish_reason, parent_tokens + len(c.token_ids), depth,
                        max_response_tokens=s.max_response_tokens, max_depth=s.max_depth,
                        stop_on_boxed=s.stop_on_boxed, repetition_window=s.repetition_window,
                        repetition_count=s.repetition_count)
                    if not c.token_ids:  # the context is full: nothing more can be generated
                        reason = "length"
                    child = tree.add(parent, c.text, c.token_ids, c.logprobs, reason)
                    if reason is None:
                        state.live.append(child.id)
                    else:
                        state.finished += 1
            still = []
            for state in states:
                if not state.live and state.finished < s.trajectories and s.fallback:
                    self._fall_back(state)
                if state.done:
                    state.tree.sampler["stats"] = {"fallbacks": state.fallbacks, "steps": step,
                                                   "decoded_tokens": state.tree.decoded_tokens()}
                    yield state.tree
                else:
                    still.append(state)
            states = still
