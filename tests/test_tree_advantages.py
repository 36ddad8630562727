"""TreePO's advantages over hand-built trees: subgroup advantages against a verl-style reference
(uid strings grouped by prefix), numbers worked out by hand, batch whitening from split sums,
per-token segment advantages, and the zero-variance check. No model."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from treetune.rollouts.advantages import (
    leaf_token_advantages,
    segment_advantages,
    subgroup_advantages,
    tree_subgroup_advantages,
    whiten,
    whiten_stats,
    zero_variance,
)
from treetune.rollouts.tree import ReasoningTree


def new_tree(problem_id: str) -> ReasoningTree:
    return ReasoningTree(problem_id=problem_id, prompt="Q\n", prompt_ids=[5, 6], answer="3", sampler={"name": "hand"})


def hand_tree() -> ReasoningTree:
    """root -> n1 [1] -> {n2 [2, 3] R=1, n3 [4] R=0, n4 [] R=1 (coupled copy, no new tokens)};
    root -> n5 [5, 6] R=0 (finished at depth 1)."""
    tree = new_tree("hand")
    n1 = tree.add(0, "a", [1])
    tree.add(n1.id, "b", [2, 3], finish_reason="boxed", outcome=1.0)
    tree.add(n1.id, "c", [4], finish_reason="eos", outcome=0.0)
    tree.add(n1.id, "", [], finish_reason="boxed", outcome=1.0)
    tree.add(0, "d", [5, 6], finish_reason="eos", outcome=0.0)
    return tree


def irregular_tree_a() -> ReasoningTree:
    """Depths 1 to 3, a coupled copy, a lone chain (a subgroup of one below the root) and dead branches."""
    tree = new_tree("a")
    n1 = tree.add(0, "s", [1, 2])
    n2 = tree.add(n1.id, "s", [3])
    tree.add(n2.id, "s", [4, 5], finish_reason="eos", outcome=1.0)
    tree.add(n2.id, "s", [6], finish_reason="boxed", outcome=0.0)
    tree.add(n2.id, "", [], finish_reason="boxed", outcome=1.0)  # coupled copy
    tree.add(n1.id, "s", [7, 8], finish_reason="eos", outcome=0.0)  # finished at depth 2
    tree.add(0, "s", [9], finish_reason="eos", outcome=1.0)  # finished at depth 1
    n8 = tree.add(0, "s", [10])
    tree.add(n8.id, "s", [11], finish_reason="length", outcome=0.5)  # only leaf under n8
    tree.add(n1.id, "s", [12])  # unfinished leaf: not a trajectory
    dead = tree.add(0, "s", [13])
    tree.add(dead.id, "s", [14], outcome=1.0)  # unfinished, even with a score
    return tree


def irregular_tree_b() -> ReasoningTree:
    """Depth 4 on one side, depth 1 on the other, a coupled copy at depth 2 and fractional rewards."""
    tree = new_tree("b")
    a = tree.add(0, "s", [1])
    b = tree.add(a.id, "s", [2, 3])
    c = tree.add(b.id, "s", [4])
    tree.add(c.id, "s", [5], finish_reason="boxed", outcome=1.0)
    tree.add(c.id, "s", [6, 7, 8], finish_reason="boxed", outcome=0.0)
    tree.add(c.id, "s", [9], finish_reason="eos", outcome=0.25)
    tree.add(b.id, "s", [10, 11], finish_reason="eos", outcome=1.0)
    tree.add(a.id, "", [], finish_reason="boxed", outcome=0.0)  # coupled copy at depth 2
    d = tree.add(0, "s", [12, 13])
    e = tree.add(d.id, "s", [14])
    tree.add(e.id, "s", [15], finish_reason="eos", outcome=0.75)
    tree.add(e.id, "s", [16, 17], finish_reason="eos", outcome=0.75)
    tree.add(0, "s", [18], finish_reason="eos", outcome=0.0)
    return tree


def uniform_tree(reward: float = 1.0) -> ReasoningTree:
    tree = new_tree("uniform")
    a = tree.add(0, "s", [1])
    tree.add(a.id, "s", [2], finish_reason="eos", outcome=reward)
    tree.add(a.id, "s", [3, 4], finish_reason="eos", outcome=reward)
    tree.add(0, "s", [5], finish_reason="eos", outcome=reward)
    return tree


# -- verl's tree_reinforce_plus_plus_baseline, average aggregation, on uid strings ---------------------
def uid(tree: ReasoningTree, leaf_id: int) -> str:
    return "#".join([tree.problem_id] + [str(node.id) for node in tree.path(leaf_id)])


def verl_subgroup(index: list[str], scores: list[float]) -> list[float]:
    """TreePO `compute_tree_reinforce_plus_plus_baseline_outcome_advantage` before whitening."""
    max_depth = max(len(u.split("#")) - 1 for u in index)
    terms: list[list[float]] = [[] for _ in index]
    for depth in range(max_depth):
        by_depth = ["#".join(u.split("#")[:depth + 1]) for u in index]
        groups: dict[str, list[float]] = defaultdict(list)
        for key, score in zip(by_depth, scores):
            groups[key].append(score)
        mean = {key: (sum(g) / len(g) if len(g) > 1 else 0.0) for key, g in groups.items()}
        for i, key in enumerate(by_depth):
            if len(groups[key]) > 1 or depth == 0:
                terms[i].append(scores[i] - mean[key])
    return [sum(t) / len(t) for t in terms]


def rows(trees: list[ReasoningTree]) -> list[tuple[int, int]]:
    """(tree index, leaf id), one per finished leaf in `tree.leaves()` order: the trainer's rows."""
    return [(i, leaf.id) for i, tree in enumerate(trees) for leaf in tree.leaves()]


@pytest.mark.parametrize("make", [hand_tree, irregular_tree_a, irregular_tree_b])
def test_subgroup_matches_verl_reference_per_tree(make):
    tree = make()
    got = tree_subgroup_advantages(tree)
    leaves = [leaf.id for leaf in tree.leaves()]
    assert list(got) == leaves  # one value per finished leaf, in the trainer's row order
    expected = verl_subgroup([uid(tree, leaf) for leaf in leaves],
                             [tree.nodes[leaf].scores["outcome"] for leaf in leaves])
    for leaf, want in zip(leaves, expected):
        assert math.isclose(got[leaf], want, abs_tol=1e-12), (leaf, got[leaf], want)


def test_subgroup_matches_verl_reference_on_a_mixed_batch():
    """verl groups the whole batch by uid prefix; distinct prompts keep trees apart."""
    trees = [irregular_tree_a(), irregular_tree_b(), hand_tree()]
    index = [uid(trees[i], leaf) for i, leaf in rows(trees)]
    scores = [trees[i].nodes[leaf].scores["outcome"] for i, leaf in rows(trees)]
    expected = verl_subgroup(index, scores)
    by_tree = [tree_subgroup_advantages(tree) for tree in trees]
    got = [by_tree[i][leaf] for i, leaf in rows(trees)]
    assert len(got) == len(expected) == 6 + 8 + 4
    assert all(math.isclose(g, e, abs_tol=1e-12) for g, e in zip(got, expected))


def test_irregular_trees_have_the_intended_shape():
    a, b = irregular_tree_a(), irregular_tree_b()
    assert [leaf.id for leaf in a.leaves()] == [3, 4, 5, 6, 7, 9]
    assert [leaf.depth for leaf in a.leaves()] == [3, 3, 3, 2, 1, 2]
    assert a.path_token_ids(5) == a.path_token_ids(2) == [1, 2, 3]  # the copy adds nothing
    assert [leaf.depth for leaf in b.leaves()] == [4, 4, 4, 3, 2, 3, 3, 1]


def test_subgroup_by_hand():
    got = tree_subgroup_advantages(hand_tree())
    # Leaves n2 (R=1), n3 (R=0), n4 (R=1), n5 (R=0).
    # Depth 0, the whole tree: mean (1 + 0 + 1 + 0) / 4 = 1/2.
    # Depth 1, under n1: {n2, n3, n4}, mean 2/3, size 3, kept; n5's own prefix has size 1, skipped.
    # n2: ((1 - 1/2) + (1 - 2/3)) / 2 = (1/2 + 1/3) / 2 = 5/12
    # n3: ((0 - 1/2) + (0 - 2/3)) / 2 = (-1/2 - 2/3) / 2 = -7/12
    # n4: same as n2 = 5/12 (the coupled copy is a full trajectory of its own)
    # n5: (0 - 1/2) / 1 = -1/2
    expected = {2: 5 / 12, 3: -7 / 12, 4: 5 / 12, 5: -1 / 2}
    assert got.keys() == expected.keys()
    assert all(math.isclose(got[k], expected[k]) for k in expected)


def test_a_tree_with_one_leaf_gets_zero():
    """Our depth-0 mean of one is the leaf's own reward, so its advantage is 0. verl's size-1 mean is 0
    (advantage R); the trainer never meets this, each tree having G >= 2 finished leaves."""
    tree = new_tree("one")
    tree.add(0, "s", [1], finish_reason="eos", outcome=1.0)
    assert tree_subgroup_advantages(tree) == {1: 0.0}


# -- whitening ----------------------------------------------------------------------------------------
def old_token_whitening(trees: list[ReasoningTree], mode: str) -> list[dict[int, float]]:
    """The two-pass whitening `subgroup_advantages` did before the split-sum refactor."""
    raw = [tree_subgroup_advantages(tree) for tree in trees]
    values, weights = [], []
    for tree, adv in zip(trees, raw):
        for leaf, value in adv.items():
            values.append(value)
            weights.append(len(tree.path_token_ids(leaf)) if mode == "token" else 1)
    total = sum(weights)
    mean = sum(v * w for v, w in zip(values, weights)) / total
    var = sum(w * (v - mean) ** 2 for v, w in zip(values, weights)) / total
    scale = 1.0 / math.sqrt(var + 1e-8)
    return [{leaf: (v - mean) * scale for leaf, v in adv.items()} for adv in raw]


@pytest.mark.parametrize("mode", ["token", "trajectory"])
def test_subgroup_whitening_unchanged_by_the_refactor(mode):
    trees = [irregular_tree_a(), irregular_tree_b(), hand_tree()]
    got = subgroup_advantages(trees, whiten=mode)
    want = old_token_whitening(trees, mode)
    for g, w in zip(got, want):
        assert list(g) == list(w)
        assert all(math.isclose(g[k], w[k], rel_tol=1e-9, abs_tol=1e-12) for k in w)


def test_token_whitening_has_token_mean_zero_and_variance_one():
    trees = [irregular_tree_a(), irregular_tree_b(), hand_tree()]
    white = subgroup_advantages(trees, whiten="token")
    # broadcast over response tokens, as verl does before masked_whiten
    tokens = [white[i][leaf] for i, leaf in rows(trees) for _ in trees[i].path_token_ids(leaf)]
    mean = sum(tokens) / len(tokens)
    var = sum((t - mean) ** 2 for t in tokens) / len(tokens)
    assert abs(mean) < 1e-9
    assert math.isclose(var, 1.0, rel_tol=1e-6)


def test_split_sums_equal_one_shot_subgroup_whitening():
    """Two "ranks" each hold half the rows; summing their three sums and whitening each half gives the
    one-process `subgroup_advantages(..., whiten="token")`."""
    trees = [irregular_tree_a(), irregular_tree_b(), hand_tree()]
    raw = [tree_subgroup_advantages(tree) for tree in trees]
    all_rows = rows(trees)
    halves = [all_rows[:7], all_rows[7:]]
    values = [[raw[i][leaf] for i, leaf in half] for half in halves]
    weights = [[len(trees[i].path_token_ids(leaf)) for i, leaf in half] for half in halves]
    stats = [whiten_stats(v, w) for v, w in zip(values, weights)]
    total = tuple(a + b for a, b in zip(*stats))
    assert total == pytest.approx(whiten_stats(values[0] + values[1], weights[0] + weights[1]))
    got = whiten(values[0], *total) + whiten(values[1], *total)
    expected = subgroup_advantages(trees, whiten="token")
    want = [expected[i][leaf] for i, leaf in all_rows]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_split_sums_equal_one_shot_for_per_token_segment_values():
    trees = [irregular_tree_a(), irregular_tree_b(), hand_tree()]
    by_tree = [segment_advantages(tree) for tree in trees]
    per_row = [leaf_token_advantages(trees[i], leaf, by_tree[i]) for i, leaf in rows(trees)]
    flat = [x for row in per_row for x in row]
    one_shot = whiten(flat, *whiten_stats(flat))
    assert abs(sum(one_shot) / len(one_shot)) < 1e-9
    assert math.isclose(sum(x * x for x in one_shot) / len(one_shot), 1.0, rel_tol=1e-6)
    first, second = [x for r in per_row[:5] for x in r], [x for r in per_row[5:] for x in r]
    total = tuple(a + b for a, b in zip(whiten_stats(first), whiten_stats(second)))
    assert whiten(first, *total) + whiten(second, *total) == pytest.approx(one_shot, rel=1e-12, abs=1e-12)


def test_whiten_edge_cases():
    assert whiten_stats([1.0, 3.0]) == (2.0, 4.0, 10.0)
    assert whiten_stats([1.0, 3.0], [2, 0]) == (2.0, 2.0, 2.0)
    assert whiten([1.0, 2.0], 0.0, 0.0, 0.0) == [1.0, 2.0]  # nothing to whiten against
    assert whiten([4.0, 4.0], *whiten_stats([4.0, 4.0])) == [0.0, 0.0]  # no spread: centred, eps keeps it finite
    with pytest.raises(ValueError, match="2 values but 1 weights"):
        whiten_stats([1.0, 2.0], [1.0])
    (flat,) = subgroup_advantages([uniform_tree()], whiten="token")
    assert all(v == 0.0 for v in flat.values())


# -- segment advantages per token ----------------------------------------------------------------------
def test_segment_token_advantages_by_hand():
    tree = hand_tree()
    seg = segment_advantages(tree)
    # V = mean reward of the finished leaves below: V(root) = 1/2, V(n1) = 2/3, V(n2) = 1, V(n3) = 0,
    # V(n4) = 1, V(n5) = 0.  A(node) = V(node) - V(parent):
    # n1: 2/3 - 1/2 = 1/6, n2: 1 - 2/3 = 1/3, n3: 0 - 2/3 = -2/3, n4: 1/3, n5: 0 - 1/2 = -1/2
    expected_nodes = {1: 1 / 6, 2: 1 / 3, 3: -2 / 3, 4: 1 / 3, 5: -1 / 2}
    assert seg.keys() == expected_nodes.keys()
    assert all(math.isclose(seg[k], expected_nodes[k]) for k in expected_nodes)
    # n2's path: token 1 from n1, tokens 2, 3 from n2; n4 (the copy) carries only n1's token
    expected_tokens = {2: [1 / 6, 1 / 3, 1 / 3], 3: [1 / 6, -2 / 3], 4: [1 / 6], 5: [-1 / 2, -1 / 2]}
    for leaf, want in expected_tokens.items():
        got = leaf_token_advantages(tree, leaf, seg)
        assert len(got) == len(tree.path_token_ids(leaf))
        assert got == pytest.approx(want)


@pytest.mark.parametrize("make", [irregular_tree_a, irregular_tree_b])
def test_each_token_takes_its_node_minus_parent(make):
    tree = make()
    seg = segment_advantages(tree)
    rewards = {leaf.id: leaf.scores["outcome"] for leaf in tree.leaves()}

    def value(node_id: int) -> float:  # recomputed from scratch, not from segment_values
        under = [r for leaf, r in rewards.items() if node_id == 0 or node_id in {n.id for n in tree.path(leaf)}]
        return sum(under) / len(under)

    for leaf in tree.leaves():
        got = leaf_token_advantages(tree, leaf.id, seg)
        want = [value(node.id) - value(node.parent) for node in tree.path(leaf.id) for _ in node.token_ids]
        assert len(got) == len(tree.path_token_ids(leaf.id))
        assert got == pytest.approx(want, abs=1e-12)


def test_leaf_token_advantages_fills_missing_nodes_with_zero():
    tree = hand_tree()
    assert leaf_token_advantages(tree, 2, {2: 0.5}) == [0.0, 0.5, 0.5]
    assert leaf_token_advantages(tree, 4, {}) == [0.0]


# -- zero variance ---------------------------------------------------------------------------------------
def test_zero_variance():
    assert not zero_variance(hand_tree())
    assert not zero_variance(irregular_tree_b())
    assert zero_variance(uniform_tree(1.0)) and zero_variance(uniform_tree(0.0))
    tree = uniform_tree(1.0)
    tree.add(1, "s", [9], outcome=0.0)  # unfinished leaf: not counted
    assert zero_variance(tree)
    for leaf in tree.leaves():
        leaf.scores["score"] = 0.5
    assert zero_variance(tree, reward_key="score")
    tree.nodes[2].scores["score"] = 0.25
    assert not zero_variance(tree, reward_key="score")
    del tree.nodes[2].scores["score"]
    with pytest.raises(KeyError, match="leaf 2 has no 'score'"):
        zero_variance(tree, reward_key="score")
    assert zero_variance(new_tree("empty"))  # no finished leaves, nothing to learn from
