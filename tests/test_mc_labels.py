"""Monte Carlo labels from trees (reused and topped up), consensus filtering and SCAN labels."""

from __future__ import annotations

import pytest
from treetune.data import PromptTemplate
from treetune.data.arith import arith_problems, check_solution
from treetune.rewards.grading import Grader
from treetune.rewards.labels.mc import LabelledSolution, consensus, mc_estimate, to_stepwise
from treetune.rewards.outcome import score_outcomes
from treetune.rollouts.flat import FlatSampler, FlatSettings
from treetune.rollouts.run import new_tree
from treetune.rollouts.tree import ReasoningTree


def hand_tree() -> ReasoningTree:
    """Six three-step trajectories; every prefix of each is shared by at least one other."""
    tree = ReasoningTree(problem_id="p", prompt="Q\n", prompt_ids=[1], answer="3")
    for text, ok in [("a\nb\nThe answer is 3", 1.0), ("a\nb\nThe answer is 4", 0.0),
                     ("a\nx\nThe answer is 3", 1.0), ("a\nx\nThe answer is 9", 0.0),
                     ("z\ny\nThe answer is 5", 0.0), ("z\ny\nThe answer is 3", 1.0)]:
        tree.add(0, text, [1], [-0.1], "eos", outcome=ok)
    return tree


def test_mc_values_from_the_tree_by_hand():
    with Grader() as grader:
        solutions = mc_estimate([hand_tree()], engine=None, grader=grader, k=1)
    # k=1: the first other trajectory continuing each prefix decides; the last step is the outcome
    assert [s.values for s in solutions] == [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0],
                                             [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    wrong = solutions[1]
    assert wrong.mc_first_error == 2 and wrong.hard_labels() == [True, True, False]


def test_labels_and_scan():
    s = LabelledSolution("p", "q", "q\n", ["s0", "s1", "s2", "s3"], [0.75, 0.5, 0.25, 0.0], False, 0.5)
    assert s.mc_first_error == 3
    assert s.hard_labels() == [True, True, True, False]
    assert s.soft_labels() == [0.75, 0.5, 0.25, 0.0]
    assert s.scan_labels() == [1.0, 1.0, 0.5, 0.0]  # min(1, 0.5/0.5), min(1, 0.25/0.5)
    right = LabelledSolution("p", "q", "q\n", ["s0", "s1"], [1.0, 1.0], True, 0.9)
    assert right.scan_labels() == [1.0, 1.0]
    assert consensus([s, right], [3, 0]) == [s]
    assert to_stepwise([s, right], "scan", min_confidence=0.75) == [
        {"prompt": "q\n", "completions": ["s0", "s1"], "labels": [1.0, 1.0]}]


@pytest.mark.slow
def test_topped_up_labels_agree_with_the_checker_often(engine):
    template = PromptTemplate(style="bare")
    trees = [new_tree(p, template, engine.tokenizer) for p in arith_problems("validation", 16)]
    trees = list(FlatSampler(FlatSettings(n=4, max_tokens=96, seed=0)).grow(engine, trees))
    with Grader() as grader:
        score_outcomes(trees, grader)
        solutions = mc_estimate(trees, engine, grader, k=4, only_wrong=True)
    assert solutions and all(not s.correct for s in solutions)
    for s in solutions:
        assert all(v * 4 == int(v * 4) for v in s.values[:-1])  # four draws per prefix
        assert s.values[-1] == 0.0  # a wrong solution's last step
    problems = {p.id: p for p in arith_problems("validation", 16)}
    judge = [check_solution(problems[s.problem_id], "\n".join(s.steps)) for s in solutions]
    agree = consensus(solutions, judge)
    assert 0 < len(agree) <= len(solutions)
