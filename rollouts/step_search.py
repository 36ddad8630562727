"""Search over reasoning steps: step-level beam search and DVTS, driven by any step scorer.

A node is one reasoning step: the engine samples up to the step delimiter (kept in the node's text;
"\\n" for arith, a blank line for MATH-style solutions), at most `step_tokens` tokens; a node keeps
whole sampled tokens, so its text runs to the end of the token completing the delimiter (a real BPE's
".\\n\\n" under "\\n": `whole_token_step`). A path stops at EOS, at a finished \\boxed{} answer, or
at the token or step limit (`stopping.finish_reason_for`).

- Beam search keeps the best M of the N candidates of a step (by the scorer's value of each path)
  and splits the N candidates of the next step evenly over the M survivors.
- DVTS (diverse verifier tree search) runs N/M independent subtrees; each samples M candidates
  per step and greedily follows the best one.

Finished candidates leave the beam as complete solutions; beam search stops when N have finished
or nothing is left alive; a DVTS subtree stops when the candidate it follows has finished. Every
candidate stays in the tree (pruned ones as unfinished leaves), with its path value in
`scores["search_value"]`; the search's answer (the best finished path) has `scores["search_pick"] = 1`.

Both follow HF search-and-learn, whose `beam_width` is the number of children per survivor
(N/M here for beam search, M for DVTS): N/M = M = 4 compares the two like for like.

The scorer is injected (rollouts never import rewards): any step scorer of `scoring.py`
(`score(problems, solutions) -> per-step scores in [0, 1]`: PRMs, the arith checker, the tool),
read as a path value through an aggregation, or a `PathValue` callable giving one value per
partial path (self-evaluation).
Identical candidate paths are scored once; a finished path that states no final answer is worth 0.
The MCTS sampler (`mcts.py`) reuses the step machinery here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from treetune.data.answers import extract_answer
from treetune.rollouts.engines import Engine, GenerationRequest, RequestResult, SamplingSettings
from treetune.rollouts.engines.base import TORN, Completion
from treetune.rollouts.scoring import AGGREGATIONS, PathValue, StepScorer, as_path_value
from treetune.rollouts.stopping import finish_reason_for, request_seed
from treetune.rollouts.tree import Node, ReasoningTree


# -- injected parts ----------------------------------------------------------------------------
class Verifier(Protocol):
    """The outcome grader's shape (`treetune.rewards.grading.Grader`): is each output's answer the gold one."""

    def grade_many(self, outputs: Sequence[str], golds: Sequence[str]) -> list[bool]: ...


# -- settings ----------------------------------------------------------------------------------
@dataclass
class StepSettings:
    step_delimiter: str = "\n"  # a step ends here (kept in its text); "\n\n" for MATH-style solutions
    step_tokens: int = 64  # at most this many tokens per step
    max_depth: int = 16  # steps per path
    max_response_tokens: int = 256
    stop_on_boxed: bool = True
    aggregation: str = "last"  # step scores -> path value: last | min | product | mean
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.step_delimiter:
            raise ValueError("step_delimiter must not be empty")
        if self.step_tokens < 1 or self.max_depth < 1:
            raise ValueError("step_tokens and max_depth must be at least 1")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; expected one of {', '.join(AGGREGATIONS)}")


@dataclass
class BeamSettings(StepSettings):
    n: int = 16  # N: candidates per step, and finished solutions wanted
    width: int = 4  # M: survivors kept per step, each expanded N/M times

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.width <= self.n:
            raise ValueError(f"beam search needs 1 <= width (M={self.width}) <= n (N={self.n})")


@dataclass
class DVTSSettings(StepSettings):
    n: int = 16  # N: candidates per step over all subtrees
    width: int = 4  # M: candidates per subtree per step; N/M subtrees

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width < 1 or self.n < self.width or self.n % self.width:
            raise ValueError(f"DVTS needs n (N={self.n}) to be a positive multiple of width (M={self.width})")


# -- step machinery (shared with mcts.py) -------------------------------------------------------
def problem_text(tree: ReasoningTree) -> str:
    return tree.problem.get("question", tree.prompt)


def path_steps(tree: ReasoningTree, node_id: int, delimiter: str) -> list[str]:
    """The steps of the path to `node_id`, split on the delimiter (a step capped by `step_tokens`
    continues in the next node, so nodes and steps need not coincide)."""
    return [part.strip() for part in tree.path_text(node_id).split(delimiter) if part.strip()]


def step_request(tree: ReasoningTree, node_id: int, n: int, s: StepSettings, salt: int) -> GenerationRequest:
    """n candidate next steps after `node_id`: sampled up to the delimiter, within the token limits."""
    prefix = tree.path_token_ids(node_id)
    room = max(1, min(s.step_tokens, s.max_response_tokens - len(prefix)))
    return GenerationRequest(
        tree.prompt_ids + prefix,
        SamplingSettings(n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=room, stop=(s.step_delimiter,),
                         include_stop=True, seed=request_seed(s.seed, tree.problem_id, salt)),
        group=tree.problem_id)


def whole_token_step(completion: Completion, delimiter: str, tokenizer: Any = None,
                     prompt_ids: Sequence[int] = ()) -> tuple[Completion, bool]:
    """A sampled step with its text and token ids in agreement, and whether it ended at the delimiter.

    An engine stopped by a stop string cuts the text right after it, but returns the token ids
    through the token that completed it, and a byte-level BPE token may hold more than the
    delimiter: Qwen samples ".\\n\\n" as one token, SmolLM2 "\\n\\n" or "\\n" plus indentation, so
    under the line delimiter "\\n" the text stops short of what the ids spell. The next step is
    prompted with the ids, so it would continue after a blank line the text does not have, and the
    tree's text and tokens would disagree. The step therefore keeps whole sampled tokens, through
    the first one that completes the delimiter (any after it are dropped with their log-probs), and
    takes the text those tokens spell: the text grows by the rest of that token, which is white
    space in Qwen's and SmolLM2's vocabularies (no token of either holds anything else after a
    newline), so the step still ends at its delimiter. Re-tokenising the cut text instead (".\\n"
    for ".\\n\\n") would put tokens the policy never sampled into the tree, with no log-probs of
    their own, and prompt the next step with a split the policy would not write (it then tends to
    open with the newline it was denied: an empty step).

    The tokens are spelled after the last `prompt_ids` (8 are enough), as an engine's detokenizer
    spells them in context: a character whose bytes began in the prompt (or a leading space that
    some tokenizers drop at the start of a decode) comes out as in the engine's text. Without a
    tokenizer the completion is taken as it comes. Completions that did not stop at the delimiter (EOS, length) come back unchanged."""
    ended = completion.finish_reason == "stop" and delimiter in completion.text
    if not ended or tokenizer is None or not completion.token_ids:
        return completion, ended
    ids, context = list(completion.token_ids), list(prompt_ids)[-8:]
    before = tokenizer.decode(context, skip_special_tokens=True).rstrip(TORN)

    def spell(k: int) -> str:
        after = tokenizer.decode(context + ids[:k], skip_special_tokens=True)
        return after[len(before):] if after.startswith(before) else tokenizer.decode(ids[:k], skip_special_tokens=True)

    k, text = len(ids), spell(len(ids))
    if text == completion.text:  # the usual case (and always on the arith tokenizer): nothing to mend
        return completion, True
    if delimiter not in text:
        raise ValueError(f"a step's tokens spell {text!r} where the engine's text is {completion.text!r}: "
                         "is the engine's tokenizer the policy's?")
    while k > 1 and delimiter in (shorter := spell(k - 1)):
        k, text = k - 1, shorter
    return replace(completion, token_ids=ids[:k], text=text,
                   logprobs=None if completion.logprobs is None else list(completion.logprobs[:k]),
                   top_logprobs=None if completion.top_logprobs is None else list(completion.top_logprobs[:k])), True


def add_steps(tree: ReasoningTree, parent: int, result: RequestResult, s: StepSettings,
              dedupe: bool = False, tokenizer: Any = None) -> tuple[list[Node], int]:
    """The result's completions as children of `parent` with their finish reasons; returns the new
    nodes and the tokens generated (duplicates dropped by `dedupe` count as generated). With the
    engine's `tokenizer`, a step's text and token ids are made to agree (`whole_token_step`)."""
    parent_text = tree.path_text(parent)
    parent_ids = tree.path_token_ids(parent)
    parent_tokens = len(parent_ids)
    prompt_tail = (list(tree.prompt_ids) + parent_ids)[-8:]  # enough to spell a step that starts in a character
    depth = tree.nodes[parent].depth + 1
    seen = {tuple(c.token_ids) for c in tree.children(parent)} if dedupe else set()
    added, generated = [], 0
    for c in result.completions:
        generated += len(c.token_ids)
        # "stop" at the delimiter ends a step, not the path; any other "stop" is EOS
        c, step_end = whole_token_step(c, s.step_delimiter, tokenizer, prompt_tail)
        if dedupe:
            key = tuple(c.token_ids)
            if key in seen:
                continue
            seen.add(key)
        engine_reason = "stop" if c.finish_reason == "stop" and not step_end else "length"
        reason = finish_reason_for(parent_text + c.text, c.text, engine_reason, parent_tokens + len(c.token_ids), depth,
                                   max_response_tokens=s.max_response_tokens, max_depth=s.max_depth,
                                   stop_on_boxed=s.stop_on_boxed)
        if not c.token_ids:  # the context is full: nothing more can be generated
            reason = "length"
        added.append(tree.add(parent, c.text, c.token_ids, c.logprobs, reason))
    return added, generated


def evaluate_paths(value: PathValue, items: Sequence[tuple[ReasoningTree, int]], delimiter: str) -> list[float]:
    """The path value of each (tree, node), all in one call to the scorer. A finished path that
    states no final answer is worth 0 whatever its steps score (a checker or PRM that only judges
    the steps present would otherwise rate a truncated solution as right)."""
    keys = []  # (problem, steps) of each item; None for a finished path without an answer
    for t, n in items:
        unanswered = t.nodes[n].finished and extract_answer(t.path_text(n)) is None
        keys.append(None if unanswered else (problem_text(t), tuple(path_steps(t, n, delimiter))))
    # a peaked policy samples the same step many times: score each distinct path once
    unique = list(dict.fromkeys(k for k in keys if k is not None))
    values = value([q for q, _ in unique], [list(steps) for _, steps in unique]) if unique else []
    if len(values) != len(unique):
        raise ValueError(f"the step scorer returned {len(values)} values for {len(unique)} paths")
    by_key = {k: float(v) for k, v in zip(unique, values)}
    return [0.0 if k is None else by_key[k] for k in keys]


def even_split(total: int, parts: int) -> list[int]:
    """`total` spread over `parts` as evenly as possible, the first ones taking the remainder."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def mark_pick(tree: ReasoningTree, node_id: int | None) -> None:
    if node_id is not None:
        tree.nodes[node_id].scores["search_pick"] = 1.0
    tree.sampler.setdefault("stats", {})["answer_leaf"] = node_id


def best_by_value(nodes: Sequence[Node]) -> Node | None:
    """The node with the highest search value; ties go to the earliest node."""
    return max(nodes, key=lambda n: (n.scores.get("search_value", -math.inf), -n.id), default=None)


# -- samplers ----------------------------------------------------------------------------------
@dataclass
class _BeamState:
    tree: ReasoningTree
    live: list[int] = field(default_factory=lambda: [0])
    completed: list[int] = field(default_factory=list)
    generated: int = 0
    scored: int = 0
    rounds: int = 0


class BeamSearchSampler:
    """Step-level beam search (see the module doc); all trees' beams go to the engine as one batch
    per step, and all new candidates to the scorer as one call."""

    name = "beam"

    def __init__(self, settings: BeamSettings, scorer: StepScorer | PathValue):
        if scorer is None:
            raise ValueError("beam search needs a step scorer (a PRM, the arith checker, ...)")
        self.settings = settings
        self.value = as_path_value(scorer, settings.aggregation)

    def grow(self, engine: Engine, trees: Sequence[ReasoningTree], progress: bool = False) -> Iterator[ReasoningTree]:
        s = self.settings
        tokenizer = getattr(engine, "tokenizer", None)  # to keep each step's text and tokens in agreement
        states = []
        for tree in trees:
            tree.sampler = {"name": self.name, **asdict(s), "scorer": getattr(self.value, "name", None)}
            states.append(_BeamState(tree))
        while states:
            owners, requests = [], []
            for st in states:
                for node_id, count in zip(st.live, even_split(s.n, len(st.live))):
                    if count:
                        owners.append((st, node_id))
                        requests.append(step_request(st.tree, node_id, count, s, salt=node_id))
            results = engine.generate(requests, progress=False)
            fresh: list[tuple[_BeamState, Node]] = []
            for (st, parent), result in zip(owners, results):
                children, generated = add_steps(st.tree, parent, result, s, tokenizer=tokenizer)
                st.generated += generated
                fresh += [(st, c) for c in children]
            values = evaluate_paths(self.value, [(st.tree, c.id) for st, c in fresh], s.step_delimiter)
            by_state: dict[int, list[Node]] = {}
            for (st, child), v in zip(fresh, values):
                child.scores["search_value"] = v
                st.scored += 1
                by_state.setdefault(id(st), []).append(child)
            still = []
            for st in states:
                st.rounds += 1
                candidates = by_state.get(id(st), [])
                st.completed += [c.id for c in candidates if c.finished]
                alive = sorted((c for c in candidates if not c.finished),
                               key=lambda c: (-c.scores["search_value"], c.id))
                st.live = [c.id for c in alive[: s.width]]
                if len(st.completed) >= s.n or not st.live:
                    yield self._finish(st)
                else:
                    still.append(st)
            states = still

    def _finish(self, st: _BeamState) -> ReasoningTree:
        tree = st.tree
        pick = best_by_value([tree.nodes[i] for i in st.completed])
        mark_pick(tree, pick.id if pick else None)
        tree.sampler["stats"].update(steps=st.rounds, generated_tokens=st.generated, scored_paths=st.scored,
                                     decoded_tokens=tree.decoded_tokens())
        return tree


@dataclass
class _DVTSState:
    tree: ReasoningTree
    follow: list[int | None]  # per subtree: the node it extends next, None once it has finished
    ends: list[int | None]
    generated: int = 0
    scored: int = 0
    rounds: int = 0


class DVTSSampler:
    """Diverse verifier tree search (see the module doc): N/M subtrees per problem, each greedily
    following the best of its M candidates per step; all subtrees of all trees are one batch."""

    name = "dvts"

    def __init__(self, settings: DVTSSettings, scorer: StepScorer | PathValue):
        if scorer is None:
            raise ValueError("DVTS needs a step scorer (a PRM, the arith checker, ...)")
        self.settings = settings
        self.value = as_path_value(scorer, settings.aggregation)

    def grow(self, engine: Engine, trees: Sequence[ReasoningTree], progress: bool = False) -> Iterator[ReasoningTree]:
        s = self.settings
        subtrees = s.n // s.width
        tokenizer = getattr(engine, "tokenizer", None)  # to keep each step's text and tokens in agreement
        states = []
        for tree in trees:
            tree.sampler = {"name": self.name, **asdict(s), "scorer": getattr(self.value, "name", None)}
            states.append(_DVTSState(tree, follow=[0] * subtrees, ends=[None] * subtrees))
        while states:
            owners, requests = [], []
            for st in states:
                for j, node_id in enumerate(st.follow):
                    if node_id is not None:
                        owners.append((st, j, node_id))
                        # subtrees that share a node (the root) must not share a seed
                        requests.append(step_request(st.tree, node_id, s.width, s, salt=node_id * subtrees + j))
            results = engine.generate(requests, progress=False)
            fresh: list[tuple[_DVTSState, int, list[Node]]] = []
            for (st, j, parent), result in zip(owners, results):
                children, generated = add_steps(st.tree, parent, result, s, tokenizer=tokenizer)
                for child in children:
                    child.scores["subtree"] = j
                st.generated += generated
                fresh.append((st, j, children))
            values = evaluate_paths(self.value, [(st.tree, c.id) for st, _, cs in fresh for c in cs], s.step_delimiter)
            flat = iter(values)
            for st, j, children in fresh:
                for child in children:
                    child.scores["search_value"] = next(flat)
                    st.scored += 1
                best = best_by_value(children)
                if best is None or best.finished:
                    st.follow[j] = None
                    st.ends[j] = best.id if best is not None else None
                else:
                    st.follow[j] = best.id
            still = []
            for st in states:
                st.rounds += 1
                if all(f is None for f in st.follow):
                    yield self._finish(st)
                else:
                    still.append(st)
            states = still

    def _finish(self, st: _DVTSState) -> ReasoningTree:
        tree = st.tree
        pick = best_by_value([tree.nodes[i] for i in st.ends if i is not None])
        mark_pick(tree, pick.id if pick else None)
        tree.sampler["stats"].update(steps=st.rounds, generated_tokens=st.generated, scored_paths=st.scored,
                                     subtree_ends=st.ends, decoded_tokens=tree.decoded_tokens())
        return tree
