"""The tree model, its JSON-lines IO (with crash repair), and the tree advantages."""

from __future__ import annotations

import math

import pytest
from treetune.data.records import DataError
from treetune.rollouts.advantages import segment_advantages, subgroup_advantages, tree_subgroup_advantages
from treetune.rollouts.tree import ReasoningTree
from treetune.rollouts.tree_io import TreeWriter, read_trees


def small_tree(problem_id: str = "p1") -> ReasoningTree:
    """root -> a -> {a1 (R=1), a2 (R=0)};  root -> b -> b1 (R=1)."""
    tree = ReasoningTree(problem_id=problem_id, prompt="Q\n", prompt_ids=[5, 6], answer="3",
                         sampler={"name": "hand"})
    a = tree.add(0, "x", [1], [-0.1])
    b = tree.add(0, "y", [2], [-0.2])
    tree.add(a.id, "1", [3, 4], [-0.3, -0.4], "boxed", outcome=1.0)
    tree.add(a.id, "0", [7], [-0.5], "eos", outcome=0.0)
    tree.add(b.id, "2", [8, 9, 10], [-0.6, -0.7, -0.8], "boxed", outcome=1.0)
    return tree


def test_navigation():
    tree = small_tree()
    assert [n.id for n in tree.leaves()] == [3, 4, 5]
    assert [n.id for n in tree.path(3)] == [1, 3]
    assert tree.path_text(3) == "x1" and tree.path_token_ids(5) == [2, 8, 9, 10]
    assert tree.path_logprobs(4) == [-0.1, -0.5]
    assert [n.id for n in tree.siblings(3)] == [4] and tree.siblings(0) == []
    assert [n.id for n in tree.subtree(1)] == [1, 3, 4]
    assert [n.id for n in tree.leaves_under(2)] == [5]
    assert tree.nodes[5].depth == 2 and tree.decoded_tokens() == 8
    assert [text for _, text in tree.iter_trajectories()] == ["x1", "x0", "y2"]


def test_json_round_trip():
    tree = small_tree()
    again = ReasoningTree.from_json(tree.to_json())
    assert again.to_dict() == tree.to_dict()
    assert [n.id for n in again.children(1)] == [3, 4]
    with pytest.raises(ValueError, match="schema version"):
        ReasoningTree.from_dict({**tree.to_dict(), "schema_version": 99})


def test_shards_load_with_datasets(tmp_path):
    import datasets

    with TreeWriter(tmp_path, shard_size=2) as writer:
        for i in range(5):
            writer.write(small_tree(f"p{i}"))
    assert len(list(tmp_path.glob("trees-*.jsonl"))) == 3
    rows = datasets.load_dataset("json", data_files=sorted(str(p) for p in tmp_path.glob("trees-*.jsonl")), split="train")
    assert rows.num_rows == 5
    back = ReasoningTree.from_dict(rows[0])
    assert back.to_dict() == small_tree("p0").to_dict()
    assert [t.problem_id for t in read_trees(tmp_path)] == [f"p{i}" for i in range(5)]


def test_writer_repairs_a_torn_last_line_and_resumes(tmp_path, caplog):
    with TreeWriter(tmp_path, shard_size=10) as writer:
        writer.write(small_tree("p0"))
        writer.write(small_tree("p1"))
    shard = tmp_path / "trees-00000.jsonl"
    whole = small_tree("p2").to_json()
    with shard.open("a") as handle:
        handle.write(whole[: len(whole) // 2])  # a kill in the middle of a write
    writer = TreeWriter(tmp_path, shard_size=10)
    assert writer.done == {"p0", "p1"}
    assert "incompletely written" in caplog.text
    writer.write(small_tree("p2"))
    writer.close()
    assert [t.problem_id for t in read_trees(tmp_path)] == ["p0", "p1", "p2"]
    with pytest.raises(ValueError, match="already written"):
        TreeWriter(tmp_path).write(small_tree("p1"))


def test_corruption_in_the_middle_is_an_error(tmp_path):
    shard = tmp_path / "trees-00000.jsonl"
    shard.write_text(small_tree("p0").to_json() + "\n{broken\n" + small_tree("p1").to_json() + "\n")
    with pytest.raises(DataError, match=r"trees-00000.jsonl:2"):
        TreeWriter(tmp_path)


def test_subgroup_advantages_by_hand():
    tree = small_tree()
    got = tree_subgroup_advantages(tree)
    expected = {3: ((1 - 2 / 3) + (1 - 0.5)) / 2, 4: ((0 - 2 / 3) + (0 - 0.5)) / 2, 5: 1 - 2 / 3}
    assert got.keys() == expected.keys()
    assert all(math.isclose(got[k], expected[k]) for k in expected)


def test_whitening_by_trajectory_and_by_token():
    tree = small_tree()
    raw = tree_subgroup_advantages(tree)
    for mode, weights in [("trajectory", {3: 1, 4: 1, 5: 1}), ("token", {3: 3, 4: 2, 5: 4})]:
        (white,) = subgroup_advantages([tree], whiten=mode)
        total = sum(weights.values())
        mean = sum(raw[k] * w for k, w in weights.items()) / total
        std = math.sqrt(sum(w * (raw[k] - mean) ** 2 for k, w in weights.items()) / total)
        for k in raw:
            assert math.isclose(white[k], (raw[k] - mean) / std, rel_tol=1e-6)


def test_segment_advantages_by_hand():
    got = segment_advantages(small_tree())
    expected = {1: 0.5 - 2 / 3, 2: 1 - 2 / 3, 3: 0.5, 4: -0.5, 5: 0.0}
    assert got.keys() == expected.keys()
    assert all(math.isclose(got[k], expected[k]) for k in expected)


def test_missing_reward_is_named():
    tree = small_tree()
    del tree.nodes[4].scores["outcome"]
    with pytest.raises(KeyError, match="leaf 4 has no 'outcome'"):
        tree_subgroup_advantages(tree)
