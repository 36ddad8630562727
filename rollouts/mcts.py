"""MCTS over reasoning steps, writing ordinary trees (a node is one step; see `step_search`).

One simulation from the current search root:
- selection: descend by PUCT, Q(c) + c_puct * p(c) * sqrt(N(parent)) / (1 + N(c)), until a node
  that is unexpanded or finished. The prior is the step's length-normalised probability
  p = exp(sum of its token log-probs / len^lambda) (MCTS-DPO; c_puct = 1.0, lambda = 1.25 there);
- expansion: k candidate steps sampled from the engine (identical ones merged). A node is expanded
  once (MCTS-DPO, AlphaMath) unless `max_children` allows progressive widening: then "sample
  another step here" competes in the PUCT argmax as an unvisited pseudo-child valued as the node
  itself, whose prior is the probability mass its children leave uncovered (1 - sum of exp(step
  log-prob)); a peaked policy whose k samples collapse to one wrong step can then still escape;
- evaluation: every new child gets a value in [-1, 1]: at a finished node the outcome verifier's
  +1 / -1 (`terminal_value="verifier"`, the training-data setting, which needs the gold answer) or
  the scorer (`"scorer"`, for test-time search); at an inner node 2 * v - 1 from the injected path
  value v in [0, 1] (a PRM, the arith checker, the policy's own self-evaluation
  `treetune.rewards.scorers.self_eval`), or 0 without one;
- backup: each new child starts at N = 1, Q = its value, and every node on the path adds the
  children's values and count. So N(s) counts the evaluations in s's subtree (its own included)
  and Q(s) is their mean: the visit-weighted mean of the children's Q, with s's own value as one
  more visit (MCTS-DPO's backup, with its step reward folded into the value). Selecting a finished
  node backs its value up once more.

With `move_root` (MCTS-DPO) each search of `iterations` simulations (`root_iterations` for the
first) ends by moving the root to its most-visited child, reusing that subtree's statistics
(`reuse_subtree`; off: they restart from each node's own value), until the root is finished:
that path is the answer. Without it, one search from the problem root, and the answer follows the
most-visited children down (or is the best finished leaf by Q).

Many trees advance together: in each iteration every unfinished tree selects one leaf, all those
leaves go to the engine as one batch and all new children to the scorer (and verifier) as one
call. Nodes keep `prior`, `value`, `visits`, `q`, `expansions` (and `search_value`, the scorer's
[0, 1] value) in their `scores`; the answer leaf has `search_pick = 1`.

Where the MCTS-DPO paper and code differ, the code is followed (PUCT constants, prior, backup);
MCTS-DPO's per-iteration deep simulation and its ground-truth-hinted self-evaluation are not: one
expansion per simulation (as AlphaMath) keeps the batches of many trees aligned, and the
self-evaluation prompt here carries no reference solution.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from treetune.rollouts.engines import Engine
from treetune.rollouts.scoring import PathValue, StepScorer, as_path_value
from treetune.rollouts.step_search import StepSettings, Verifier, add_steps, evaluate_paths, mark_pick, step_request
from treetune.rollouts.tree import Node, ReasoningTree


@dataclass
class MCTSSettings(StepSettings):
    iterations: int = 8  # simulations per search (per move with move_root)
    root_iterations: int | None = None  # the first search's simulations (MCTS-DPO: 4 x iterations)
    width: int = 4  # k: candidate steps sampled per expansion
    root_width: int | None = None  # k at the problem root
    max_depth: int = 8
    c_puct: float = 1.0
    length_penalty: float = 1.25  # lambda in the prior exp(sum log p / len^lambda)
    move_root: bool = True
    reuse_subtree: bool = True
    terminal_value: str = "verifier"  # verifier (+1 / -1 against the gold answer) | scorer
    dedupe: bool = True
    max_children: int = 0  # > width: progressive widening up to this many children per node (0: expand once)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterations < 1 or self.width < 1 or (self.root_iterations is not None and self.root_iterations < 1):
            raise ValueError("iterations, root_iterations and width must be at least 1")
        if self.terminal_value not in ("verifier", "scorer"):
            raise ValueError(f"terminal_value must be 'verifier' or 'scorer', not {self.terminal_value!r}")


# -- the search's arithmetic (pure functions over node scores) ----------------------------------
def step_prior(logprobs: Sequence[float] | None, length_penalty: float = 1.25) -> float:
    """exp(sum of the step's token log-probs / len^lambda); 1 for a step without log-probs."""
    if not logprobs:
        return 1.0
    return math.exp(sum(logprobs) / len(logprobs) ** length_penalty)


def puct(q: float, prior: float, parent_visits: int, visits: int, c_puct: float) -> float:
    return q + c_puct * prior * math.sqrt(parent_visits) / (1 + visits)


def select_child(tree: ReasoningTree, node_id: int, c_puct: float) -> int:
    """The child with the highest PUCT score; ties go to the earliest child."""
    parent_visits = tree.nodes[node_id].scores.get("visits", 0)
    children = tree.children(node_id)
    if not children:
        raise ValueError(f"node {node_id} of tree {tree.problem_id} has no children to select from")
    return max(children, key=lambda c: (puct(c.scores["q"], c.scores["prior"], parent_visits, c.scores["visits"], c_puct),
                                        -c.id)).id


def widen_score(tree: ReasoningTree, node_id: int, c_puct: float) -> float:
    """PUCT of the pseudo-action "sample another step here": unvisited, valued as the node itself,
    with the probability mass its children do not cover yet, 1 - sum of exp(step log-prob), as prior."""
    node = tree.nodes[node_id]
    covered = sum(math.exp(sum(c.logprobs or [0.0])) for c in tree.children(node_id))
    return puct(node.scores.get("value", 0.0), max(0.0, 1.0 - covered), node.scores.get("visits", 0), 0, c_puct)


def select_path(tree: ReasoningTree, root: int, c_puct: float, max_children: int = 0) -> list[int]:
    """Node ids from `root` down by PUCT to the first node that is finished or not yet expanded, or
    (with `max_children`) an expanded node with room where sampling another step beats every child."""
    path = [root]
    while not tree.nodes[path[-1]].finished and tree.children(path[-1]):
        node_id = path[-1]
        best = select_child(tree, node_id, c_puct)
        children = tree.children(node_id)
        if len(children) < max_children:
            parent_visits = tree.nodes[node_id].scores.get("visits", 0)
            b = tree.nodes[best].scores
            if widen_score(tree, node_id, c_puct) > puct(b["q"], b["prior"], parent_visits, b["visits"], c_puct):
                break
        path.append(best)
    return path


def init_node(node: Node, prior: float, value: float) -> None:
    node.scores.update(prior=prior, value=value, visits=1, q=value)


def backup(tree: ReasoningTree, path: Sequence[int], value_sum: float, count: int) -> None:
    """Add `count` evaluations summing to `value_sum` to every node of `path`."""
    for node_id in path:
        scores = tree.nodes[node_id].scores
        visits = scores.get("visits", 0)
        if count == 0:
            continue
        scores["q"] = (scores.get("q", 0.0) * visits + value_sum) / (visits + count)
        scores["visits"] = visits + count


def best_move(tree: ReasoningTree, node_id: int) -> int:
    """The most-visited child (ties: higher Q, then the earlier child)."""
    return max(tree.children(node_id), key=lambda c: (c.scores["visits"], c.scores["q"], -c.id)).id


def reset_subtree(tree: ReasoningTree, node_id: int) -> None:
    """Forget the visits below `node_id`: every node back to its own evaluation."""
    for node in tree.subtree(node_id):
        if node.id == 0:
            node.scores.update(visits=0, q=0.0)
        else:
            node.scores.update(visits=1, q=node.scores["value"])


# -- the sampler --------------------------------------------------------------------------------
class _State:
    def __init__(self, tree: ReasoningTree, budget: int):
        self.tree = tree
        self.root = 0
        self.budget = budget  # simulations left in the current search
        self.simulations = 0
        self.expansions = 0
        self.moves = 0
        self.generated = 0
        self.done = False


class MCTSSampler:
    """MCTS rollouts (see the module doc). `scorer` values inner nodes (a step scorer, read through
    `settings.aggregation`, or a path value such as self-evaluation); `verifier` grades finished
    nodes against the gold answer when `terminal_value="verifier"`."""

    name = "mcts"

    def __init__(self, settings: MCTSSettings, scorer: StepScorer | PathValue | None = None,
                 verifier: Verifier | None = None):
        if settings.terminal_value == "verifier" and verifier is None:
            raise ValueError("MCTS with terminal_value='verifier' needs a verifier (the outcome grader)")
        if settings.terminal_value == "scorer" and scorer is None:
            raise ValueError("MCTS with terminal_value='scorer' needs a step scorer")
        self.settings = settings
        self.value = as_path_value(scorer, settings.aggregation)
        self.verifier = verifier
        self.engine_calls: list[int] = []  # requests per engine call, for benchmarks

    def grow(self, engine: Engine, trees: Sequence[ReasoningTree], progress: bool = False) -> Iterator[ReasoningTree]:
        """Search every tree to its answer; yields each tree as soon as it is finished."""
        s = self.settings
        tokenizer = getattr(engine, "tokenizer", None)  # to keep each step's text and tokens in agreement
        states = []
        for tree in trees:
            tree.sampler = {"name": self.name, **asdict(s), "scorer": getattr(self.value, "name", None)}
            tree.root.scores.update(visits=0, q=0.0)
            states.append(_State(tree, s.root_iterations or s.iterations))
        while states:
            expansions: list[tuple[_State, list[int]]] = []
            for st in states:
                path = select_path(st.tree, st.root, s.c_puct, s.max_children)
                leaf = st.tree.nodes[path[-1]]
                if leaf.finished:  # nothing to expand: the finished node's value counts once more
                    backup(st.tree, path, leaf.scores["value"], 1)
                else:
                    expansions.append((st, path))
            # a node widened again must not repeat its earlier samples: the salt counts its children
            requests = [step_request(st.tree, path[-1], self._width(path[-1]), s,
                                     salt=path[-1] * 1009 + len(st.tree.children(path[-1]))) for st, path in expansions]
            results = engine.generate(requests, progress=False) if requests else []
            if requests:
                self.engine_calls.append(len(requests))
            born: list[tuple[_State, list[int], list[Node]]] = []
            for (st, path), result in zip(expansions, results):
                children, generated = add_steps(st.tree, path[-1], result, s, dedupe=s.dedupe, tokenizer=tokenizer)
                expanded = st.tree.nodes[path[-1]].scores
                expanded["expansions"] = expanded.get("expansions", 0) + 1  # more than 1: widened
                st.generated += generated
                st.expansions += 1
                born.append((st, path, children))
            self._evaluate([(st.tree, c) for st, _, cs in born for c in cs])
            for st, path, children in born:
                backup(st.tree, path, sum(c.scores["value"] for c in children), len(children))
            still = []
            for st in states:
                st.simulations += 1
                st.budget -= 1
                if st.budget <= 0:
                    self._end_search(st)
                if st.done:
                    yield self._finish(st)
                else:
                    still.append(st)
            states = still

    def _width(self, node_id: int) -> int:
        s = self.settings
        return (s.root_width or s.width) if node_id == 0 else s.width

    def _evaluate(self, items: list[tuple[ReasoningTree, Node]]) -> None:
        """Prior and value of every new node: one scorer call, one verifier call for all of them."""
        s = self.settings
        graded = [(t, n) for t, n in items if n.finished and s.terminal_value == "verifier"]
        scored = [(t, n) for t, n in items if not (n.finished and s.terminal_value == "verifier")]
        verdicts = self.verifier.grade_many([t.path_text(n.id) for t, n in graded], [t.answer for t, _ in graded]) if graded else []
        if self.value is not None:
            values = evaluate_paths(self.value, [(t, n.id) for t, n in scored], s.step_delimiter)
        else:
            values = [None] * len(scored)
        for (_, node), ok in zip(graded, verdicts):
            init_node(node, step_prior(node.logprobs, s.length_penalty), 1.0 if ok else -1.0)
        for (_, node), v in zip(scored, values):
            if v is not None:
                node.scores["search_value"] = v
            init_node(node, step_prior(node.logprobs, s.length_penalty), 0.0 if v is None else 2.0 * v - 1.0)

    def _end_search(self, st: _State) -> None:
        s, tree = self.settings, st.tree
        if not s.move_root or not tree.children(st.root):
            st.done = True
            return
        st.root = best_move(tree, st.root)
        st.moves += 1
        if tree.nodes[st.root].finished:
            st.done = True
            return
        if not s.reuse_subtree:
            reset_subtree(tree, st.root)
        st.budget = s.iterations

    def _answer(self, st: _State) -> int | None:
        tree = st.tree
        node = st.root
        while not tree.nodes[node].finished and tree.children(node):
            node = best_move(tree, node)
        if tree.nodes[node].finished and node != 0:
            return node
        finished = [n for n in tree.nodes[1:] if n.finished]
        return max(finished, key=lambda n: (n.scores["q"], n.scores["visits"], -n.id)).id if finished else None

    def _finish(self, st: _State) -> ReasoningTree:
        tree = st.tree
        mark_pick(tree, self._answer(st))
        tree.sampler["stats"].update(simulations=st.simulations, expansions=st.expansions, moves=st.moves,
                                     generated_tokens=st.generated, decoded_tokens=tree.decoded_tokens())
        return tree
