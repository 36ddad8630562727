"""Advantages over finished, scored trees (TreePO §2.3 and its code).

- `subgroup_advantages`: each trajectory's reward minus the mean reward of the trajectories
  that share each of its ancestors (the whole tree at depth 0), averaged over depths; subgroups
  of one are skipped below the root. Then whitened over the batch, by default per token (each
  trajectory's advantage counted once per response token, as TreePO's masked whitening does).
- `segment_advantages`: a node's value is the mean reward of the finished leaves below it; a
  segment's advantage is its value minus its parent's value. `leaf_token_advantages` spreads them
  over a leaf's path tokens, the (B, T) form a trainer feeds its loss.
- `whiten_stats` / `whiten`: weighted whitening split into sums a trainer can all-reduce across
  ranks before whitening each rank's slice (`subgroup_advantages` uses the same pair).
- `zero_variance`: whether a tree's finished leaves all scored the same (no learning signal).

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
    sums = whiten_stats(values, weights)
    if sums[0] <= 0:
        return raw
    return [dict(zip(advantages, _whiten(list(advantages.values()), *sums))) for advantages in raw]


def whiten_stats(values: Sequence[float], weights: Sequence[float] | None = None) -> tuple[float, float, float]:
    """(Σw, Σw·v, Σw·v²) over `values` (weights default to 1 each).

    Sums from several ranks (or batch slices) add up: all-reduce them, then `whiten` each slice with
    the totals. For TreePO's token whitening give a trajectory-level advantage its response length as
    weight, or give per-token values weight 1.
    """
    if weights is None:
        weights = [1.0] * len(values)
    elif len(weights) != len(values):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    sum_w = sum_wv = sum_wv2 = 0.0
    for v, w in zip(values, weights):
        v, w = float(v), float(w)
        sum_w += w
        sum_wv += w * v
        sum_wv2 += w * v * v
    return sum_w, sum_wv, sum_wv2


def whiten(values: Sequence[float], sum_w: float, sum_wv: float, sum_wv2: float,
           eps: float = 1e-8) -> list[float]:
    """(v - mean) / sqrt(var + eps), with the weighted mean and (biased) variance taken from the sums
    of `whiten_stats`. Values are returned as they are when the total weight is 0."""
    if sum_w <= 0:
        return [float(v) for v in values]
    mean = sum_wv / sum_w
    var = max(sum_wv2 / sum_w - mean * mean, 0.0)  # E[v²] - E[v]², clipped against rounding
    scale = 1.0 / math.sqrt(var + eps)
    return [(float(v) - mean) * scale for v in values]


_whiten = whiten  # `subgroup_advantages` has an argument of that name


def zero_variance(tree: ReasoningTree, reward_key: str = "outcome") -> bool:
    """True when all finished leaves have the same reward (also when there are none): every
    advantage of the tree is then 0 before whitening."""
    return len({_reward(tree, leaf.id, reward_key) for leaf in tree.leaves()}) <= 1


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


def leaf_token_advantages(tree: ReasoningTree, leaf_id: int, node_advantages: dict[int, float]) -> list[float]:
    """One value per token of the leaf's path: each token takes the advantage of the node that added
    it (0.0 for nodes without one), the per-token (B, T) form of `segment_advantages`."""
    out: list[float] = []
    for node in tree.path(leaf_id):
        out += [float(node_advantages.get(node.id, 0.0))] * len(node.token_ids)
    return out
