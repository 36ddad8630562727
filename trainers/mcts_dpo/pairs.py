"""Step-level preference pairs read off MCTS trees (MCTS-DPO, Xie et al. 2024, §2.4 of our notes).

Walk down the search's selected path (root to the leaf marked `search_pick`). At every node of it
with two or more children, the children are the candidates: each one's text runs on through any
chain of only-children below it (as the reference code does, so near the leaves a candidate is
the rest of the solution). The candidate with the highest Q is chosen; the rejected one is the
lowest-Q candidate (`rejected="lowest"`, the paper's wording) or a random non-best one
(`rejected="random"`, what the released code always does: its `--choose_random` is store_true with
default True, overriding `--choose_worst`; with two candidates both give the same pair).
Candidates are ranked by (Q, prior, value, visits), the code's tuple minus the reference model's
probability. A pair whose two Q's differ by no more than `min_q_gap` is skipped: equal Q's (e.g.
two unevaluated steps) state no preference. A candidate with no visible text (an immediate EOS)
is not a step and takes no part (the pair record format needs text on both sides).

Each pair carries the cDPO label smoothing from the two visit counts,
eps = min(1 - N_w / (N_w + N_l), 0.5) (the code's clip of the paper's 1 / (N_w/N_l + 1)): a
chosen step the search visited much more than the rejected one is trusted, a rarely visited
"winner" is not. `correct_only` (the code's `--filter`) keeps only trees whose selected answer is
right. At most `max_pairs_per_tree` pairs a tree (the code's `max_n_sample = 8`), nearest the
root first.

The pair keeps the exact token ids the policy produced (prompt ids + selected prefix, candidate
ids), so training sees the same tokens the search scored, never a re-tokenisation.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from treetune.data.step_pairs import StepPair
from treetune.rollouts.tree import Node, ReasoningTree

REJECTED_CHOICES = ("lowest", "random")


@dataclass
class Candidate:
    """One child of a decision node with its only-child chain below it."""

    node: Node
    text: str
    token_ids: list[int]
    end: int  # id of the chain's last node

    @property
    def rank(self) -> tuple:
        s = self.node.scores
        return (s.get("q", 0.0), s.get("prior", 0.0), s.get("value", 0.0), s.get("visits", 0))


def visit_smoothing(chosen_visits: float, rejected_visits: float) -> float:
    """cDPO label smoothing from visit counts: min(1 - N_w / (N_w + N_l), 0.5); 0.5 when neither was visited."""
    total = chosen_visits + rejected_visits
    if total <= 0:
        return 0.5
    return min(1.0 - chosen_visits / total, 0.5)


def selected_leaf(tree: ReasoningTree) -> Node | None:
    picked = [n for n in tree.nodes[1:] if n.scores.get("search_pick")]
    return picked[0] if picked else None


def selected_correct(tree: ReasoningTree) -> bool | None:
    """Whether the selected answer is right: its graded `outcome` if present, else its verifier value (+1 / -1)."""
    leaf = selected_leaf(tree)
    if leaf is None:
        return None
    if "outcome" in leaf.scores:
        return leaf.scores["outcome"] > 0.5
    if "value" in leaf.scores and (tree.sampler or {}).get("terminal_value", "verifier") == "verifier":
        return leaf.scores["value"] > 0
    return None


def candidate(tree: ReasoningTree, node: Node) -> Candidate:
    """The child's text and tokens, continued through every only-child below it."""
    text, ids, current = node.text, list(node.token_ids), node
    while True:
        kids = tree.children(current.id)
        if len(kids) != 1:
            break
        current = kids[0]
        text += current.text
        ids += current.token_ids
    return Candidate(node=node, text=text, token_ids=ids, end=current.id)


def tree_pairs(tree: ReasoningTree, rejected: str = "lowest", max_pairs_per_tree: int = 8, min_q_gap: float = 0.0,
               rng: random.Random | None = None) -> list[StepPair]:
    """The pairs of one searched tree along its selected path (see the module doc)."""
    if rejected not in REJECTED_CHOICES:
        raise ValueError(f"rejected must be one of {', '.join(REJECTED_CHOICES)}, not {rejected!r}")
    rng = rng or random.Random(0)
    leaf = selected_leaf(tree)
    if leaf is None:
        return []
    question = tree.problem.get("question", tree.prompt)
    pairs: list[StepPair] = []
    for decision in [tree.root] + tree.path(leaf.id)[:-1]:
        if len(pairs) >= max_pairs_per_tree:
            break
        kids = tree.children(decision.id)
        ranked = sorted((c for c in (candidate(tree, k) for k in kids) if c.text.strip()), key=lambda c: c.rank)
        if len(ranked) < 2:
            continue
        best = ranked[-1]
        worse = ranked[0] if rejected == "lowest" else ranked[rng.randrange(len(ranked) - 1)]
        q_w, q_l = best.node.scores.get("q", 0.0), worse.node.scores.get("q", 0.0)
        if q_w - q_l <= min_q_gap or best.text == worse.text:
            continue
        n_w, n_l = best.node.scores.get("visits", 0), worse.node.scores.get("visits", 0)
        pairs.append(StepPair(
            prompt=question, initial_reason_steps=tree.path_text(decision.id), chosen=best.text, rejected=worse.text,
            answer=tree.answer, problem_id=tree.problem_id, step_index=decision.depth, origin="mcts",
            chosen_value=q_w, rejected_value=q_l,
            extra={"label_smoothing": visit_smoothing(n_w, n_l), "chosen_visits": n_w, "rejected_visits": n_l,
                   "candidates": len(kids), "on_selected_path": best.node.id in {n.id for n in tree.path(leaf.id)},
                   "prompt_ids": list(tree.prompt_ids) + tree.path_token_ids(decision.id),
                   "chosen_ids": best.token_ids, "rejected_ids": worse.token_ids}))
    return pairs


def mcts_pairs(trees: Sequence[ReasoningTree], rejected: str = "lowest", max_pairs_per_tree: int = 8,
               min_q_gap: float = 0.0, correct_only: bool = True, seed: int = 0) -> tuple[list[StepPair], dict]:
    """Pairs of all trees and a summary (trees used, why others gave none, mean smoothing)."""
    rng = random.Random(seed)
    pairs: list[StepPair] = []
    why: Counter = Counter()
    correct = 0
    for tree in trees:
        ok = selected_correct(tree)
        correct += bool(ok)
        if selected_leaf(tree) is None:
            why["no selected answer"] += 1
            continue
        if correct_only and not ok:
            why["selected answer wrong (filtered)"] += 1
            continue
        mine = tree_pairs(tree, rejected, max_pairs_per_tree, min_q_gap, rng)
        if not mine:
            why["no decision point with a Q gap"] += 1
        pairs += mine
    eps = [p.extra["label_smoothing"] for p in pairs]
    summary = {"trees": len(trees), "selected_correct": correct / max(1, len(trees)), "pairs": len(pairs),
               "trees_with_pairs": len({p.problem_id for p in pairs}), "why_no_pairs": dict(why),
               "label_smoothing_mean": sum(eps) / len(eps) if eps else None,
               "label_smoothing_at_cap": sum(e >= 0.5 for e in eps)}
    return pairs, summary
