"""Advantages over finished, scored trees (TreePO §2.3 and its code).

- `subgroup_advantages`: each trajectory's reward minus the mean reward of the trajectories
  that share each of its ancestors (the whole tree at depth 0), averaged over depths; subgroups
  of one are skipped below the root. Then whitened over the batch, by default per token (each
  trajectory's advantage counted once per response token, as TreePO's masked whitening does).
- `segment_advantages`: a node's value is the mean reward of the finished leaves below it; a
  segment's advantage is its value minus its parent's value.

Rewards are read from `leaf.scores[reward_key]`; a finished leaf without it is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from treetune.rollouts.tree import ReasoningTree


def _reward(tree: ReasoningTree, node_id: int, key: str) -> float:
    scores = tree.nodes[node_id].scores
    if key not in scores:
        raise KeyError(f"tree {tree.problem_id!r}: leaf {node_id} has no '{key}' score")
    return float(scores[key])


def tree_subgroup_advantages(tree: ReasoningTree, reward_key: str = "outcome") -> dict[int, float]:
    """Leaf id -> mean over depths of (reward - mean reward of the leaves sharing that ancestor)."""
    leaves = tree.leaves()
    rewards = {leaf.id: _reward(tree, leaf.id, reward_key) for leaf in leaves}
    group_mean: dict[int, tuple[float, int]] = {}

    def mean_under(node_id: int) -> tuple[float, int]:
        if node_id not in group_mean:
            members = [rewards[n.id] for n in tree.leaves_under(node_id)]
            group_mean[node_id] = (sum(members) / len(members), len(members))
        return group_mean[node_id]

    out = {}
    for leaf in leaves:
        ancestors = [0] + [n.id for n in tree.path(leaf.id)[:-1]]  # depth 0 .. depth(leaf) - 1
        terms = []
        for depth, ancestor in enumerate(ancestors):
            mean, size = mean_under(ancestor)
            if depth > 0 and size < 2:
                continue
            terms.append(rewards[leaf.id] - mean)
        out[leaf.id] = sum(terms) / len(terms)
    return out


def subgroup_advantages(trees: Sequence[ReasoningTree], reward_key: str = "outcome",
                        whiten: str | None = "token") -> list[dict[int, float]]:
    """`tree_subgroup_advantages` for every tree, whitened over the whole batch.

    `whiten`: "token" (weights each trajectory by its response length), "trajectory", or None.
    """
    raw = [tree_subgroup_advantages(tree, reward_key) for tree in trees]
    if whiten is None:
        return raw
    if whiten not in ("token", "trajectory"):
        raise ValueError(f"whiten must be 'token', 'trajectory' or None, not {whiten!r}")
    values, weights = [], []
    for tree, advantages in zip(trees, raw):
        for leaf_id, value in advantages.items():
            values.append(value)
            weights.append(len(tree.path_token_ids(leaf_id)) if whiten == "token" else 1)
    total = sum(weights)
    if total == 0:
        return raw
    mean = sum(v * w for v, w in zip(values, weights)) / total
    var = sum(w * (v - mean) ** 2 for v, w in zip(values, weights)) / total
    scale = 1.0 / math.sqrt(var + 1e-8)
    return [{leaf: (v - mean) * scale for leaf, v in advantages.items()} for advantages in raw]


def segment_values(tree: ReasoningTree, reward_key: str = "outcome") -> dict[int, float]:
    """Node id -> mean reward of the finished leaves below it (nodes with none are left out)."""
    values = {}
    for node in tree.nodes:
        leaves = tree.leaves_under(node.id)
        if leaves:
            values[node.id] = sum(_reward(tree, leaf.id, reward_key) for leaf in leaves) / len(leaves)
    return values


def segment_advantages(tree: ReasoningTree, reward_key: str = "outcome") -> dict[int, float]:
    """Node id -> V(node) - V(parent), for every non-root node with finished leaves below it."""
    values = segment_values(tree, reward_key)
    return {node.id: values[node.id] - values[node.parent]
            for node in tree.nodes[1:] if node.id in values and node.parent in values}
