"""MCTS rollouts with real vLLM on the tiny policy: PUCT and backup by hand, batching across trees,
checker-driven search against greedy decoding, the tree format round trip."""

from __future__ import annotations

import math

import pytest
from recording import Recording
from treetune.data import PromptTemplate
from treetune.data.answers import extract_answer
from treetune.data.arith import arith_problems
from treetune.rewards.scorers.arith_checker import ArithCheckerScorer
from treetune.rewards.scorers.self_eval import SelfEvaluation
from treetune.rollouts.engines import GenerationRequest, SamplingSettings
from treetune.rollouts.mcts import (
    MCTSSampler,
    MCTSSettings,
    backup,
    best_move,
    puct,
    select_child,
    select_path,
    step_prior,
)
from treetune.rollouts.run import RolloutArgs, make_sampler, new_tree
from treetune.rollouts.tree import ReasoningTree
from treetune.rollouts.tree_io import TreeWriter, read_trees


@pytest.fixture(scope="module")
def grader():
    from treetune.rewards.grading import Grader

    with Grader(processes=1) as grader:
        yield grader


def trees_for(engine, problems):
    template = PromptTemplate(style="bare")
    return [new_tree(p, template, engine.tokenizer) for p in problems]


def hand_tree() -> ReasoningTree:
    """root (N=4) -> a (q=0.5, p=0.5, N=3) -> a1 (q=0.5, N=2, unexpanded), and root -> b (q=-0.2, p=0.9, N=1)."""
    tree = ReasoningTree(problem_id="hand", prompt="q\n", prompt_ids=[1], answer="1")
    tree.root.scores.update(visits=4, q=0.25)
    a = tree.add(0, "a\n", [2], prior=0.5, value=0.5, visits=3, q=0.5)
    tree.add(a.id, "a1\n", [3], prior=0.8, value=0.5, visits=2, q=0.5)
    tree.add(0, "b\n", [4], prior=0.9, value=-0.2, visits=1, q=-0.2)
    return tree


def test_prior_and_puct_by_hand():
    assert step_prior([-0.5, -0.5], 1.25) == pytest.approx(math.exp(-1.0 / 2 ** 1.25))
    assert step_prior([-0.5, -0.5], 1.0) == pytest.approx(math.exp(-0.5))  # AlphaMath's geometric mean
    assert step_prior([], 1.25) == 1.0
    tree = hand_tree()
    # a: 0.5 + 1.0 * 0.5 * sqrt(4) / (1 + 3) = 0.75; b: -0.2 + 1.0 * 0.9 * 2 / 2 = 0.70
    assert puct(0.5, 0.5, 4, 3, 1.0) == pytest.approx(0.75)
    assert puct(-0.2, 0.9, 4, 1, 1.0) == pytest.approx(0.70)
    assert select_child(tree, 0, c_puct=1.0) == 1
    # with c_puct = 2: a = 0.5 + 0.5 = 1.0, b = -0.2 + 1.8 = 1.6, so exploration wins
    assert select_child(tree, 0, c_puct=2.0) == 3
    assert select_path(tree, 0, 1.0) == [0, 1, 2]  # down to the unexpanded a1
    assert select_path(tree, 0, 2.0) == [0, 3]


def test_backup_by_hand():
    tree = hand_tree()
    # expanding a1 gave two children valued +1 and 0: the path root, a, a1 adds 2 visits summing to 1
    backup(tree, [0, 1, 2], 1.0, 2)
    assert tree.nodes[2].scores["visits"] == 4 and tree.nodes[2].scores["q"] == pytest.approx((0.5 * 2 + 1.0) / 4)
    assert tree.nodes[1].scores["visits"] == 5 and tree.nodes[1].scores["q"] == pytest.approx((0.5 * 3 + 1.0) / 5)
    assert tree.nodes[0].scores["visits"] == 6 and tree.nodes[0].scores["q"] == pytest.approx((0.25 * 4 + 1.0) / 6)
    assert tree.nodes[3].scores["visits"] == 1  # off the path: untouched
    # the move goes to the most-visited child
    assert best_move(tree, 0) == 1


@pytest.mark.slow
def test_mcts_statistics_are_visit_weighted(engine):
    # With one search from the root (no moves), every node's N is its own evaluation plus its
    # children's N, and N * Q is its own value plus the children's N * Q (the root has no value).
    s = MCTSSettings(iterations=6, width=3, move_root=False, terminal_value="scorer", max_response_tokens=128, seed=4)
    trees = list(MCTSSampler(s, ArithCheckerScorer()).grow(engine, trees_for(engine, arith_problems("validation", 4))))
    for tree in trees:
        assert tree.sampler["stats"]["simulations"] == 6
        for node in tree.nodes:
            children = tree.children(node.id)
            if node.finished:
                assert not children and node.scores["visits"] >= 1
                continue
            if not children:
                assert node.scores["visits"] == 1 and node.scores["q"] == node.scores["value"]
                continue
            own_n, own_w = (0, 0.0) if node.id == 0 else (1, node.scores["value"])
            assert node.scores["visits"] == own_n + sum(c.scores["visits"] for c in children)
            assert node.scores["q"] * node.scores["visits"] == pytest.approx(
                own_w + sum(c.scores["q"] * c.scores["visits"] for c in children))
            assert len({tuple(c.token_ids) for c in children}) == len(children)  # duplicates merged
            for c in children:
                assert c.scores["prior"] == pytest.approx(step_prior(c.logprobs, s.length_penalty))
                assert -1.0 <= c.scores["value"] <= 1.0


@pytest.mark.slow
def test_one_iteration_batches_leaves_of_many_trees(engine):
    recording = Recording(engine)
    problems = arith_problems("validation", 6)
    s = MCTSSettings(iterations=3, width=3, terminal_value="scorer", max_response_tokens=128, seed=5)
    sampler = MCTSSampler(s, ArithCheckerScorer())
    trees = list(sampler.grow(recording, trees_for(engine, problems)))
    assert len(trees) == 6
    ids = {t.problem_id for t in trees}
    first = recording.batches[0]
    assert [r.group for r in first] == [p.id for p in problems]  # the roots of all six trees in one call
    for batch in recording.batches:
        groups = [r.group for r in batch]
        assert len(groups) == len(set(groups)) and set(groups) <= ids  # one leaf per tree per iteration
    assert sum(len(b) > 1 for b in recording.batches) >= len(recording.batches) // 2
    assert sampler.engine_calls == [len(b) for b in recording.batches]
    for tree in trees:  # the root moved down until it reached a finished step: that is the answer
        pick = tree.sampler["stats"]["answer_leaf"]
        assert tree.nodes[pick].finished and tree.sampler["stats"]["moves"] == tree.nodes[pick].depth
        # each move went to the most-visited child; its siblings left the search then, so it still leads
        for node in tree.path(pick):
            assert node.scores["visits"] >= max((n.scores["visits"] for n in tree.siblings(node.id)), default=0)


@pytest.mark.slow
def test_checker_driven_mcts_fixes_greedy_mistakes(engine):
    problems = arith_problems("validation", 60)
    template = PromptTemplate(style="bare")
    greedy = engine.generate([GenerationRequest(template.render_ids(p.question, engine.tokenizer),
                                                SamplingSettings(temperature=0.0, max_tokens=96)) for p in problems])
    wrong = [p for p, r in zip(problems, greedy) if extract_answer(r.completions[0].text) != p.answer][:8]
    assert len(wrong) == 8
    # Greedy gets all eight wrong; MCTS steered by the exact checker (no gold answer) recovers several
    # (4 to 5 of 8 across seeds when written). Widening lets nodes whose samples collapsed grow more children.
    s = MCTSSettings(iterations=6, width=4, max_children=16, terminal_value="scorer", max_response_tokens=128, seed=0)
    trees = list(MCTSSampler(s, ArithCheckerScorer()).grow(engine, trees_for(engine, wrong)))
    gold = {p.id: p.answer for p in wrong}
    right = sum(extract_answer(t.path_text(t.sampler["stats"]["answer_leaf"])) == gold[t.problem_id] for t in trees)
    assert right >= 2, right
    assert max(n.scores.get("expansions", 0) for t in trees for n in t.nodes) > 1  # some node was widened
    assert all(len(t.children(n.id)) <= s.max_children + s.width - 1 for t in trees for n in t.nodes)


@pytest.mark.slow
def test_verifier_values_and_the_tree_format(engine, grader, tmp_path):
    args = RolloutArgs(sampler="mcts", mcts_iterations=4, search_width=3, max_tokens=128, max_depth=8, seed=6,
                       reuse_subtree=False)
    sampler = make_sampler(args, ArithCheckerScorer(), grader)
    assert isinstance(sampler, MCTSSampler) and sampler.settings.terminal_value == "verifier"
    problems = arith_problems("validation", 4)
    trees = list(sampler.grow(engine, trees_for(engine, problems)))
    gold = {p.id: p.answer for p in problems}
    for tree in trees:
        for leaf in tree.leaves():  # finished nodes are graded +1 / -1 against the gold answer
            right = extract_answer(tree.path_text(leaf.id)) == gold[tree.problem_id]
            assert leaf.scores["value"] == (1.0 if right else -1.0)
    with TreeWriter(tmp_path / "trees") as writer:
        for tree in trees:
            writer.write(tree)
    back = list(read_trees(tmp_path / "trees"))
    assert [t.to_dict() for t in back] == [t.to_dict() for t in trees]
    for before, after in zip(trees, back):
        assert after.sampler["name"] == "mcts" and after.sampler["stats"] == before.sampler["stats"]
        for a, b in zip(before.nodes, after.nodes):
            assert (a.scores.get("visits"), a.scores.get("q"), a.scores.get("prior")) == \
                   (b.scores.get("visits"), b.scores.get("q"), b.scores.get("prior"))
    from datasets import load_dataset

    rows = load_dataset("json", data_files=str(tmp_path / "trees" / "*.jsonl"), split="train")
    again = [ReasoningTree.from_dict(r) for r in rows]
    # datasets reads these floats back as float32 (-0.00089367025066 -> -0.0008936703)
    assert [close(a.to_dict()["nodes"], b.to_dict()["nodes"]) for a, b in zip(again, trees)] == [True] * len(trees)
    assert all(a.sampler["name"] == "mcts" and a.sampler["stats"]["answer_leaf"] == b.sampler["stats"]["answer_leaf"]
               for a, b in zip(again, trees))


def close(a, b) -> bool:
    """Equal, floats up to float32 rounding."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_self_evaluation_is_a_batched_path_value(engine):
    recording = Recording(engine)
    judge = SelfEvaluation(recording, engine.tokenizer, samples=4)
    values = judge(["Mia has 7 pens. She gets 5 more. How many pens does Mia have now?"] * 3,
                   [["7+5=12"], ["7+5=13"], ["7+5=12", "The answer is \\boxed{12}"]])
    assert len(recording.batches) == 1 and len(recording.batches[0]) == 3
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in values)
    assert judge.generated_tokens > 0
    # as the inner-node value of a search
    s = MCTSSettings(iterations=2, width=2, terminal_value="scorer", max_response_tokens=64, seed=7)
    trees = list(MCTSSampler(s, judge).grow(engine, trees_for(engine, arith_problems("validation", 2))))
    assert all(n.scores["value"] in (-1.0, -0.5, 0.0, 0.5, 1.0) for t in trees for n in t.nodes[1:])
