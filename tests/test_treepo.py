"""TreePO and flat sampling with real vLLM on the tiny policy: budgets, prefixes, stops, fallback."""

from __future__ import annotations

import pytest
from recording import Recording
from treetune.data import PromptTemplate
from treetune.data.arith import arith_problems
from treetune.rollouts.flat import FlatSampler, FlatSettings
from treetune.rollouts.run import new_tree
from treetune.rollouts.stopping import finish_reason_for, has_repetition
from treetune.rollouts.treepo import TreePOSampler, TreePOSettings, split_budget


def fresh_trees(engine, count=6):
    template = PromptTemplate(style="bare")
    return [new_tree(p, template, engine.tokenizer) for p in arith_problems("validation", count)]


def test_split_budget():
    assert split_budget(4, [1, 1], 2) == [2, 2]
    assert split_budget(3, [1, 1, 1], 2) == [1, 1, 1]
    assert split_budget(5, [1, 1, 1], 2) == [2, 2, 1]
    assert split_budget(5, [10.0, 1.0, 0.1], 3) == [3, 1, 1]
    assert sum(split_budget(7, [0.2, 0.5, 0.3, 0.9], 2)) == 7


def test_repetition_and_finish_rules():
    assert has_repetition("abcd" * 80, window=8, count=8)
    assert not has_repetition("the quick brown fox jumps over the lazy dog", window=8, count=2)
    common = dict(max_response_tokens=100, max_depth=5)
    assert finish_reason_for("1+2=3\nThe answer is \\boxed{3}", "x", "stop", 10, 1, **common) == "boxed"
    assert finish_reason_for("1+2=3", "x", "stop", 10, 1, **common) == "eos"
    assert finish_reason_for("The answer is \\boxed{3}", "x", "length", 10, 1, **common) == "boxed"
    assert finish_reason_for("The answer is \\boxed{3}", "x", "length", 10, 1, stop_on_boxed=False, **common) is None
    assert finish_reason_for("1+2", "x", "length", 100, 1, **common) == "length"
    assert finish_reason_for("1+2", "x", "length", 10, 5, **common) == "depth"
    assert finish_reason_for("1+2", "x", "length", 10, 2, **common) is None


@pytest.mark.slow
def test_treepo_invariants(engine):
    recording = Recording(engine)
    settings = TreePOSettings(trajectories=8, segment_tokens=6, max_depth=12, max_response_tokens=96, seed=3)
    trees = list(TreePOSampler(settings).grow(recording, fresh_trees(engine)))
    assert len(trees) == 6
    tokenizer = engine.tokenizer
    for tree in trees:
        leaves = tree.leaves()
        assert len(leaves) == settings.trajectories  # fallback fills the budget, never more
        assert all(leaf.finished for leaf in tree.leaves(finished_only=False))  # no path left dangling
        for node in tree.nodes[1:]:
            assert len(node.token_ids) <= settings.segment_tokens
            assert len(node.logprobs) == len(node.token_ids)
        for leaf in leaves:
            assert tree.path_text(leaf.id) == "".join(n.text for n in tree.path(leaf.id))
            eos = tokenizer.eos_token_id
            ids = [t for t in tree.path_token_ids(leaf.id) if t != eos]
            assert tokenizer.decode(ids) == tree.path_text(leaf.id)
        assert {l.finish_reason for l in leaves} <= {"boxed", "eos", "length", "depth", "repetition"}
    # Every request extends exactly its parent's tokens: prompt + the path so far.
    by_prompt = {}
    for tree in trees:
        for node in tree.nodes:
            by_prompt.setdefault(tuple(tree.prompt_ids + tree.path_token_ids(node.id)), node)
    for batch in recording.batches:
        for request in batch:
            assert tuple(request.prompt_ids) in by_prompt
    # The first batch holds the roots of all problems at once, one request per root.
    assert len(recording.batches[0]) == 6 and all(r.sampling.n == 2 for r in recording.batches[0])
    assert max(len(b) for b in recording.batches) > 6  # later depths batch many paths of many trees
    assert any(l.finish_reason == "boxed" for t in trees for l in t.leaves())  # early stop on the answer


@pytest.mark.slow
def test_fallback_fires_when_paths_run_out(engine):
    # Two segments of three tokens cannot finish a solution: every path stops at the depth limit
    # after four leaves, so the remaining budget must come from re-forking finished paths.
    settings = TreePOSettings(trajectories=10, segment_tokens=3, max_depth=2, max_response_tokens=96, seed=1)
    trees = list(TreePOSampler(settings).grow(engine, fresh_trees(engine, 3)))
    for tree in trees:
        assert tree.sampler["stats"]["fallbacks"] > 0
        assert len(tree.leaves()) == 10
        assert all(l.finish_reason == "depth" for l in tree.leaves())
    no_fallback = TreePOSettings(trajectories=10, segment_tokens=3, max_depth=2, max_response_tokens=96, seed=1, fallback=False)
    for tree in TreePOSampler(no_fallback).grow(engine, fresh_trees(engine, 3)):
        assert len(tree.leaves()) == 4 and tree.sampler["stats"]["fallbacks"] == 0


@pytest.mark.slow
def test_logprob_budget_runs(engine):
    settings = TreePOSettings(trajectories=8, segment_tokens=6, budget="logprob", favour="high", seed=2,
                              init_divergence=2, init_divergence_max=4, max_response_tokens=96)
    trees = list(TreePOSampler(settings).grow(engine, fresh_trees(engine, 4)))
    assert all(len(t.leaves()) == 8 for t in trees)
    assert {len(t.children(0)) for t in trees} <= {2, 3, 4}


@pytest.mark.slow
def test_flat_sampling_is_a_depth_one_tree(engine):
    trees = list(FlatSampler(FlatSettings(n=5, max_tokens=96, seed=0)).grow(engine, fresh_trees(engine, 3)))
    for tree in trees:
        assert len(tree.leaves()) == 5 and all(l.depth == 1 for l in tree.leaves())
        assert tree.sampler["name"] == "flat"
    again = list(FlatSampler(FlatSettings(n=5, max_tokens=96, seed=0)).grow(engine, fresh_trees(engine, 3)))
    assert [[l.token_ids for l in t.leaves()] for t in again] == [[l.token_ids for l in t.leaves()] for t in trees]


def test_coupled_fork_draws_like_independent_samples(tiny_policy_path):
    # A two-token probe: an independent sample keeps its first token with p 0.7, else takes the
    # others in the ratio 2:1; after it, keeps the second with p 0.5, else 3:2. The coupled split of
    # 20,000 trajectories must reproduce those frequencies (no engine needed: the probe is given).
    import math
    import random

    from transformers import AutoTokenizer
    from treetune.rollouts.engines import Completion
    from treetune.rollouts.treepo_coupled import _Coupled, _settle, _Texts

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_path)
    a, b, c, d = tokenizer.convert_tokens_to_ids(list("4567"))
    log = math.log
    probe = Completion([a, d], "47", [log(0.7), log(0.5)], "length",
                       [{a: log(0.7), b: log(0.2), c: log(0.1)}, {d: log(0.5), a: log(0.3), b: log(0.2)}])
    tree = new_tree(arith_problems("validation", 1)[0], PromptTemplate(style="bare"), tokenizer)
    state = _Coupled(tree, random.Random(0))
    total = 20000
    _settle(state, 0, total, probe, TreePOSettings(fork="coupled", max_response_tokens=96), _Texts(tokenizer))
    assert sum(count for _, count in state.groups) == total  # nobody lost, nobody finished
    first, second = {}, {}
    for node, count in state.groups:
        ids = tree.path_token_ids(node)
        first[ids[0]] = first.get(ids[0], 0) + count
        if ids[0] == a and len(ids) > 1:
            second[ids[1]] = second.get(ids[1], 0) + count
    for token, p in ((a, 0.7), (b, 0.2), (c, 0.1)):
        assert abs(first[token] / total - p) < 0.015
    for token, p in ((d, 0.5), (a, 0.3), (b, 0.2)):
        assert abs(second[token] / first[a] - p) < 0.02
    assert all(len(tree.path_token_ids(n)) <= 2 for n, _ in state.groups)


@pytest.mark.slow
def test_coupled_treepo_invariants(engine):
    recording = Recording(engine)
    recording.tokenizer = engine.tokenizer
    settings = TreePOSettings(trajectories=8, segment_tokens=6, max_response_tokens=96, seed=3, fork="coupled")
    trees = list(TreePOSampler(settings).grow(recording, fresh_trees(engine)))
    assert len(trees) == 6
    eos = engine.tokenizer.eos_token_id
    for tree in trees:
        leaves = tree.leaves()
        assert len(leaves) == settings.trajectories  # exactly w, no fallback needed
        assert all(leaf.finished for leaf in tree.leaves(finished_only=False))
        for node in tree.nodes[1:]:
            assert len(node.token_ids) <= settings.segment_tokens and len(node.logprobs) == len(node.token_ids)
            if not node.token_ids:  # a copy of a finished path: a leaf under that path's last node
                assert tree.is_leaf(node.id) and tree.nodes[node.parent].token_ids
        for leaf in leaves:
            assert tree.path_text(leaf.id) == "".join(n.text for n in tree.path(leaf.id))
            ids = [t for t in tree.path_token_ids(leaf.id) if t != eos]
            assert engine.tokenizer.decode(ids) == tree.path_text(leaf.id)
        # shared prefixes are decoded once: fewer tokens than the trajectories' total length
        assert tree.decoded_tokens() < sum(len(tree.path_token_ids(l.id)) for l in leaves)
    by_prompt = {tuple(t.prompt_ids + t.path_token_ids(n.id)) for t in trees for n in t.nodes}
    for batch in recording.batches:
        assert all(r.sampling.n == 1 and tuple(r.prompt_ids) in by_prompt for r in batch)  # one probe per group
    assert len(recording.batches[0]) == 6 and max(len(b) for b in recording.batches) > 6
    assert any(len({t.path_text(l.id) for l in t.leaves()}) > 1 for t in trees)  # trajectories do fork
    assert any(l.finish_reason == "boxed" for t in trees for l in t.leaves())


def test_fork_setting_is_checked():
    import pytest

    with pytest.raises(ValueError, match="fork"):
        TreePOSettings(fork="sometimes")
    with pytest.raises(ValueError, match="coupled_top_k"):
        TreePOSettings(fork="coupled", coupled_top_k=1)
