"""Coupled fork points for TreePO (`fork="coupled"`): share a prefix only as long as independent
samples would have agreed on it, so the tree holds w exactly independent trajectories.

Why: with fixed fork points (fork every l tokens, b ways) all w trajectories share the first
segment's few samples; on arith most errors are in the first equation, so the votes become
correlated and maj@16 / pass@16 drop although each trajectory is still a fair sample. Cutting at
low-probability tokens does not fix it on its own: the tiny policy's errors are tail tokens at
positions where the likeliest token has p 0.8-0.98 (it has p >= 0.9 at 93% of the positions of
flat samples), and a cut placed *because* the sampled token
was unlikely biases the re-forked branches towards likely tokens.

How (a maximal coupling, per node holding k trajectories still to draw):
1. Decode one probe x of at most l tokens from the node (n=1, with the top-k log-probs).
2. Each of the other k-1 trajectories walks along x and leaves it at position j with probability
   1 - p(x_j) (p: the processed probability of the sampled token). Leaving at j, its token is drawn
   from p restricted to tokens other than x_j. An independent sample agrees with x at j with
   probability exactly p(x_j), and when it does not its token follows p without x_j, so every
   trajectory is an independent sample and the w leaves are distributed as flat sampling's (up to
   the top-k renormalisation below, and the same early stop on a boxed answer as fixed TreePO).
3. The probe is split at the leaving points; trajectories that left at j continue as new groups
   below their one-token node; those that stayed to the end of x continue from x (or, when x
   finished, are identical copies of it: zero-token leaves under x, decoded once).
The draw at a leaving point uses the top-k log-probs the engine returned for that position
(renormalised; the mass outside the top k is dropped and reported as `dropped_mass`), which saves
a one-token engine call per fork. All probes of all problems at one round go as one batch.
Settings used: trajectories, segment_tokens, max_response_tokens, stop rules, temperature, top_p,
seed, coupled_top_k; branch, budget, init divergence, depth limit and fallback do not apply
(every tree ends with exactly w trajectories, and the length limit bounds depth).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from treetune.rollouts.engines import Engine, GenerationRequest, SamplingSettings
from treetune.rollouts.stopping import finish_reason_for, request_seed
from treetune.rollouts.tree import ReasoningTree


def segment_request(s, tree: ReasoningTree, node: int, n: int, step: int, top_logprobs: int = 0) -> GenerationRequest:
    """One segment's request from `node`: n samples of at most `segment_tokens` (within the length
    limit), seeded by problem, node and round; grouped by problem so its prefix cache is reused."""
    used = len(tree.path_token_ids(node))
    return GenerationRequest(
        tree.prompt_ids + tree.path_token_ids(node),
        SamplingSettings(n=n, temperature=s.temperature, top_p=s.top_p,
                         max_tokens=max(1, min(s.segment_tokens, s.max_response_tokens - used)),
                         seed=request_seed(s.seed, tree.problem_id, node * 1000 + step), top_logprobs=top_logprobs),
        group=tree.problem_id)


@dataclass
class _Coupled:
    tree: ReasoningTree
    rng: random.Random
    groups: list[tuple[int, int]] = field(default_factory=list)  # (node, trajectories still to draw below it)
    stats: Counter = field(default_factory=Counter)


class _Texts:
    """Node text as the difference of decoded paths, so texts always concatenate to the decoded path."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos = tokenizer, tokenizer.eos_token_id

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t != self.eos])

    def piece(self, prefix_ids: Sequence[int], piece_ids: Sequence[int]) -> str:
        before = self.decode(prefix_ids)
        after = self.decode(list(prefix_ids) + list(piece_ids))
        return after[len(before):] if after.startswith(before) else self.decode(piece_ids)


def grow_coupled(settings, engine: Engine, trees: Sequence[ReasoningTree]) -> Iterator[ReasoningTree]:
    """Grow each tree to `settings.trajectories` exactly independent trajectories (see module doc)."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("fork='coupled' needs an engine with a tokenizer (to give split segments their text)")
    texts = _Texts(tokenizer)
    s = settings
    states = [_Coupled(tree, random.Random(request_seed(s.seed, tree.problem_id, -1)), [(0, s.trajectories)])
              for tree in trees]
    step = 0
    while states:
        batch = [(state, node, count) for state in states for node, count in sorted(state.groups)]
        for state in states:
            state.groups = []
        requests = [segment_request(s, state.tree, node, 1, step, top_logprobs=s.coupled_top_k)
                    for state, node, _ in batch]
        results = engine.generate(requests, progress=False)
        step += 1
        for (state, node, count), result in zip(batch, results):
            _settle(state, node, count, result.completions[0], s, texts)
        still = []
        for state in states:
            if state.groups:
                still.append(state)
                continue
            stats = state.stats
            state.tree.sampler["stats"] = {
                "fallbacks": 0, "steps": step, "decoded_tokens": state.tree.decoded_tokens(),
                "probes": stats["probes"], "forks": stats["forks"], "copies": stats["copies"],
                "dropped_mass": stats["dropped_mass"] / max(1, stats["forks"])}
            yield state.tree
        states = still


def _settle(state: _Coupled, node: int, count: int, probe, s, texts: _Texts) -> None:
    """Split the probe where the other trajectories leave it; queue the groups that go on."""
    tree, rng = state.tree, state.rng
    state.stats["probes"] += 1
    ids, logprobs = probe.token_ids, probe.logprobs or []
    top = probe.top_logprobs or [{} for _ in ids]
    if not ids:  # the context is full: nothing more can be generated
        _finish(tree, tree.add(node, "", [], [], None).id, "length", count, state)
        return
    leave_at: Counter = Counter()
    stay = 1  # the probe itself
    # a trajectory may leave only where the top k offer another token (else it stays: dropped mass)
    can_leave = [any(t != token for t in position) for token, position in zip(ids, top)]
    for _ in range(count - 1):
        j = next((j for j, lp in enumerate(logprobs) if rng.random() >= math.exp(lp) and can_leave[j]), None)
        if j is None:
            stay += 1
        else:
            leave_at[j] += 1
    base = tree.path_token_ids(node)
    cuts = sorted(leave_at)
    attach, start = node, 0  # attach: the node whose path is the probe's first `start` tokens
    for j in cuts + [len(ids)]:
        if j > start:
            piece = ids[start:j]
            attach = tree.add(attach, texts.piece(base + ids[:start], piece), piece, logprobs[start:j]).id
            start = j
        if j == len(ids):
            break
        _fork(state, attach, top[j], ids[j], logprobs[j], leave_at[j], s, texts)
    # the probe's tail: finished (with the trajectories that agreed all the way) or live
    path_tokens = len(base) + len(ids)
    reason = finish_reason_for(
        tree.path_text(attach), texts.decode(ids), probe.finish_reason, path_tokens, 1,
        max_response_tokens=s.max_response_tokens, max_depth=None, stop_on_boxed=s.stop_on_boxed,
        repetition_window=s.repetition_window, repetition_count=s.repetition_count)
    if reason is None:
        state.groups.append((attach, stay))
    else:
        _finish(tree, attach, reason, stay, state)


def _fork(state: _Coupled, attach: int, position: dict[int, float], avoid: int, avoid_logprob: float,
          leaving: int, s, texts: _Texts) -> None:
    """`leaving` trajectories take a token other than `avoid` after `attach`, drawn from the top-k
    probabilities at that position; identical draws share one node and go on as one group."""
    tree, rng = state.tree, state.rng
    others = {t: math.exp(lp) for t, lp in position.items() if t != avoid}
    state.stats["forks"] += leaving
    state.stats["dropped_mass"] += leaving * max(0.0, 1.0 - math.exp(avoid_logprob) - sum(others.values()))
    tokens, weights = list(others), list(others.values())
    drawn = Counter(rng.choices(tokens, weights=weights, k=leaving))
    base = tree.path_token_ids(attach)
    for token in tokens:  # in rank order, so the tree does not depend on set order
        if token not in drawn:
            continue
        child = tree.add(attach, texts.piece(base, [token]), [token], [position[token]])
        reason = finish_reason_for(
            tree.path_text(child.id), child.text, "stop" if token == texts.eos else "length", len(base) + 1, 1,
            max_response_tokens=s.max_response_tokens, max_depth=None, stop_on_boxed=s.stop_on_boxed,
            repetition_window=s.repetition_window, repetition_count=s.repetition_count)
        if reason is None:
            state.groups.append((child.id, drawn[token]))
        else:
            _finish(tree, child.id, reason, drawn[token], state)


def _finish(tree: ReasoningTree, node: int, reason: str, copies: int, state: _Coupled) -> None:
    """End `copies` identical trajectories at `node`: the node itself, or zero-token leaves under it."""
    if copies == 1:
        tree.nodes[node].finish_reason = reason
        return
    state.stats["copies"] += copies - 1
    for _ in range(copies):
        tree.add(node, "", [], [], reason)
