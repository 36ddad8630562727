"""TreePO and flat sampling with real vLLM on the tiny policy: budgets, prefixes, stops, fallback."""

from __future__ import annotations

from treetune.data import PromptTemplate
from treetune.data.arith import arith_problems
from treetune.rollouts.flat import FlatSampler, FlatSettings
from treetune.rollouts.job import new_tree
from treetune.rollouts.stopping import finish_reason_for, has_repetition
from treetune.rollouts.treepo import TreePOSampler, TreePOSettings, split_budget

from recording import Recording


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


def test_logprob_budget_runs(engine):
    settings = TreePOSettings(trajectories=8, segment_tokens=6, budget="logprob", favour="high", seed=2,
                              init_divergence=2, init_divergence_max=4, max_response_tokens=96)
    trees = list(TreePOSampler(settings).grow(engine, fresh_trees(engine, 4)))
    assert all(len(t.leaves()) == 8 for t in trees)
    assert {len(t.children(0)) for t in trees} <= {2, 3, 4}


def test_flat_sampling_is_a_depth_one_tree(engine):
    trees = list(FlatSampler(FlatSettings(n=5, max_tokens=96, seed=0)).grow(engine, fresh_trees(engine, 3)))
    for tree in trees:
        assert len(tree.leaves()) == 5 and all(l.depth == 1 for l in tree.leaves())
        assert tree.sampler["name"] == "flat"
    again = list(FlatSampler(FlatSettings(n=5, max_tokens=96, seed=0)).grow(engine, fresh_trees(engine, 3)))
    assert [[l.token_ids for l in t.leaves()] for t in again] == [[l.token_ids for l in t.leaves()] for t in trees]
