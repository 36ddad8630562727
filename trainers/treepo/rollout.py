"""Rollouts for GRPO rows: one tree per prompt group, grown by treetune's samplers, each finished
leaf one completion row.

TRL hands a rank its prompts already repeated G times (`RepeatSampler`), in groups of G equal
prompts; a tree with exactly G finished leaves replaces each group, so TRL's `view(-1, G)` and
the tree advantages see the same groups. A leaf's completion is its whole root-to-leaf path (the
shared prefixes are repeated in every row that goes through them, as in TreePO's verl code: the
savings are on the rollout side). Trees are seeded by (run seed, optimizer step, problem), so a
resumed run regrows the trees it would have grown.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from treetune.data.problem import Problem
from treetune.rollouts.flat import FlatSampler, FlatSettings
from treetune.rollouts.tree import ReasoningTree
from treetune.rollouts.treepo import TreePOSampler, TreePOSettings


def step_seed(seed: int, step: int) -> int:
    """The sampler seed of one optimizer step (request seeds then mix in the problem and the node)."""
    return (seed * 1_000_003 + step) % (2**31 - 1)


def make_sampler(config, group_size: int, seed: int, flat: bool = False):
    """The sampler of `config` (a `TreePOConfig`) growing trees of `group_size` finished leaves."""
    if flat or config.sampler == "flat":
        return FlatSampler(FlatSettings(n=group_size, temperature=config.temperature, top_p=config.top_p or 1.0,
                                        max_tokens=config.max_completion_length, seed=seed))
    return TreePOSampler(TreePOSettings(
        trajectories=group_size, segment_tokens=config.segment_tokens, max_depth=config.max_depth,
        max_response_tokens=config.max_completion_length, branch=config.branch,
        init_divergence=config.init_divergence, init_divergence_max=config.init_divergence_max,
        budget=config.budget, stop_on_boxed=config.stop_on_boxed, fallback=config.fallback,
        temperature=config.temperature, top_p=config.top_p or 1.0, seed=seed, fork=config.fork,
        coupled_top_k=config.coupled_top_k))


@dataclass
class PromptBook:
    """The problems behind the prompt texts TRL passes around: text -> (problem, prompt token ids)."""

    entries: dict[str, tuple[Problem, list[int]]] = field(default_factory=dict)

    def add(self, text: str, problem: Problem, prompt_ids: list[int]) -> None:
        self.entries.setdefault(text, (problem, prompt_ids))

    def __getitem__(self, text: str) -> tuple[Problem, list[int]]:
        if text not in self.entries:
            raise KeyError(f"prompt not in the training problems: {text[:80]!r}")
        return self.entries[text]


@dataclass
class Rollout:
    """What one generation produced: the trees, each row's (tree index, leaf id), and counters."""

    trees: list[ReasoningTree]
    rows: list[tuple[int, int]]
    seconds: float
    decoded_tokens: int
    row_tokens: int  # tokens of all rows' completions: what flat sampling would have decoded
    fallbacks: int

    def share(self, index: int, parts: int) -> "Rollout":
        """Part `index` of `parts` equal parts, by whole trees (a tensor-parallel rank's own prompts).
        Every rank of the group decoded all of them together, so each reports an equal share of the
        counters and their sum over the group counts the work once."""
        if len(self.trees) % parts:
            raise ValueError(f"{len(self.trees)} trees do not split into {parts} equal parts")
        per = len(self.trees) // parts
        keep = range(index * per, (index + 1) * per)
        rows = [(tree - keep.start, leaf) for tree, leaf in self.rows if tree in keep]
        return Rollout(trees=self.trees[keep.start:keep.stop], rows=rows, seconds=self.seconds,
                       decoded_tokens=self.decoded_tokens // parts, row_tokens=self.row_tokens // parts,
                       fallbacks=self.fallbacks // parts)


def grow_groups(prompts: Sequence[str], group_size: int, book: PromptBook, engine, sampler) -> Rollout:
    """One tree per run of `group_size` equal prompts, grown together; exactly `group_size` leaves each."""
    if len(prompts) % group_size:
        raise ValueError(f"{len(prompts)} prompts are not whole groups of {group_size}")
    trees, seen = [], {}
    for start in range(0, len(prompts), group_size):
        group = prompts[start:start + group_size]
        if any(p != group[0] for p in group):
            raise ValueError(f"rows {start}..{start + group_size - 1} are not one prompt repeated {group_size} times: "
                             "a group is split (per-rank rows must be a multiple of num_generations)")
        problem, prompt_ids = book[group[0]]
        copy = seen[problem.id] = seen.get(problem.id, -1) + 1  # the same problem twice: different trees
        trees.append(ReasoningTree(problem_id=problem.id if copy == 0 else f"{problem.id}#{copy}", prompt=group[0],
                                   prompt_ids=list(prompt_ids), answer=problem.answer,
                                   problem={"question": problem.question, "source": problem.source}))
    start = time.perf_counter()
    for _ in sampler.grow(engine, trees):  # grows the trees in place; yields each when finished
        pass
    seconds = time.perf_counter() - start
    rows, fallbacks = [], 0
    for index, tree in enumerate(trees):
        leaves = tree.leaves()
        if len(leaves) != group_size:
            raise RuntimeError(f"tree {tree.problem_id!r} finished {len(leaves)} leaves, not {group_size}: turn "
                               "--fallback on (TreePO keeps re-forking until every tree has G leaves)")
        rows += [(index, leaf.id) for leaf in leaves]
        fallbacks += (tree.sampler.get("stats") or {}).get("fallbacks", 0)
    return Rollout(trees=trees, rows=rows, seconds=seconds, decoded_tokens=sum(t.decoded_tokens() for t in trees),
                   row_tokens=sum(len(trees[i].path_token_ids(leaf)) for i, leaf in rows), fallbacks=fallbacks)


def row_fields(rollout: Rollout) -> dict[str, list]:
    """`rollout_func`'s output: prompt and completion ids, sampled log-probs, and the columns the
    reward functions read (the leaf's text, gold answer and question)."""
    out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "text": [], "answer": [], "question": [],
           "finish": []}
    for index, leaf_id in rollout.rows:
        tree = rollout.trees[index]
        logprobs = []
        for node in tree.path(leaf_id):
            logprobs += list(node.logprobs) if node.logprobs is not None else [math.nan] * len(node.token_ids)
        out["prompt_ids"].append(list(tree.prompt_ids))
        out["completion_ids"].append(tree.path_token_ids(leaf_id))
        out["logprobs"].append(logprobs)
        out["text"].append(tree.path_text(leaf_id))
        out["answer"].append(tree.answer)
        out["question"].append(tree.problem["question"])
        out["finish"].append(tree.nodes[leaf_id].finish_reason)
    return out
