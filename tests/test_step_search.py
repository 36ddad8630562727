"""Step-level beam search and DVTS with real vLLM on the tiny policy, driven by the exact arith checker."""

from __future__ import annotations

import pytest
from recording import Recording
from treetune.data import PromptTemplate
from treetune.data.answers import extract_answer
from treetune.data.arith import arith_problems
from treetune.rewards.scorers.arith_checker import ArithCheckerScorer
from treetune.rollouts.engines import GenerationRequest, SamplingSettings
from treetune.rollouts.run import RolloutArgs, make_sampler, new_tree
from treetune.rollouts.scoring import ScorerValue
from treetune.rollouts.step_search import BeamSearchSampler, BeamSettings, DVTSSampler, DVTSSettings, evaluate_paths, path_steps
from treetune.rollouts.tree import ReasoningTree


@pytest.fixture(scope="module")
def greedy_failures(engine):
    """Validation problems the policy gets wrong when decoding greedily (the policy alone)."""
    problems = arith_problems("validation", 60)
    template = PromptTemplate(style="bare")
    requests = [GenerationRequest(template.render_ids(p.question, engine.tokenizer),
                                  SamplingSettings(temperature=0.0, max_tokens=96)) for p in problems]
    results = engine.generate(requests)
    wrong = [p for p, r in zip(problems, results) if extract_answer(r.completions[0].text) != p.answer]
    assert len(wrong) >= 8, "the tiny policy should fail greedily on some validation problems"
    return wrong[:8]


def trees_for(engine, problems):
    template = PromptTemplate(style="bare")
    return [new_tree(p, template, engine.tokenizer) for p in problems]


def right_picks(trees, problems) -> int:
    """How many trees' picked answers are right (trees come back in the order they finish)."""
    gold = {p.id: p.answer for p in problems}
    right = 0
    for tree in trees:
        leaf = tree.sampler["stats"]["answer_leaf"]
        right += leaf is not None and extract_answer(tree.path_text(leaf)) == gold[tree.problem_id]
    return right


def test_path_values_and_unanswered_paths():
    tree = ReasoningTree(problem_id="p", prompt="Mia has 7 pens. She gets 5 more. How many pens does Mia have now?\n",
                         prompt_ids=[1], answer="12", problem={"question": "Mia has 7 pens. She gets 5 more. How many pens does Mia have now?"})
    right = tree.add(0, "7+5=12\n", [1])
    done = tree.add(right.id, "The answer is \\boxed{12}", [2], finish_reason="boxed")
    wrong = tree.add(0, "7+5=13\n", [3])
    cut = tree.add(right.id, "12", [4], finish_reason="length")  # finished, but states no answer
    value = ScorerValue(ArithCheckerScorer(), "min")
    assert path_steps(tree, done.id, "\n") == ["7+5=12", "The answer is \\boxed{12}"]
    assert evaluate_paths(value, [(tree, right.id), (tree, done.id), (tree, wrong.id), (tree, cut.id)], "\n") == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="aggregation"):
        ScorerValue(ArithCheckerScorer(), "median")


def test_settings_and_registration():
    with pytest.raises(ValueError, match="width"):
        BeamSettings(n=4, width=8)
    with pytest.raises(ValueError, match="multiple"):
        DVTSSettings(n=10, width=4)
    with pytest.raises(ValueError, match="scorer"):
        make_sampler(RolloutArgs(sampler="beam"))
    beam = make_sampler(RolloutArgs(sampler="beam", trajectories=8, search_width=2, step_delimiter="\\n\\n"), ArithCheckerScorer())
    assert isinstance(beam, BeamSearchSampler) and beam.settings.n == 8 and beam.settings.width == 2
    assert beam.settings.step_delimiter == "\n\n"  # typed on a command line as backslash-n
    assert isinstance(make_sampler(RolloutArgs(sampler="dvts"), ArithCheckerScorer()), DVTSSampler)


@pytest.mark.slow
def test_beam_search_keeps_the_best_and_refills(engine):
    recording = Recording(engine)
    s = BeamSettings(n=8, width=3, max_response_tokens=128, seed=1)
    trees = list(BeamSearchSampler(s, ArithCheckerScorer()).grow(recording, trees_for(engine, arith_problems("validation", 5))))
    assert len(trees) == 5
    for tree in trees:
        by_depth: dict[int, list] = {}
        for node in tree.nodes[1:]:
            by_depth.setdefault(node.depth, []).append(node)
            assert "search_value" in node.scores
            assert node.finished or node.text.endswith("\n") or len(node.token_ids) == s.step_tokens
        for depth, nodes in by_depth.items():
            expanded = [n for n in nodes if tree.children(n.id)]
            if not expanded:
                continue
            alive = sorted((n for n in nodes if not n.finished), key=lambda n: (-n.scores["search_value"], n.id))
            assert sorted(n.id for n in alive[: s.width]) == sorted(n.id for n in expanded)  # the best M survive
            assert sum(len(tree.children(n.id)) for n in expanded) == s.n  # ... and are duplicated back to N
        assert len(tree.children(0)) == s.n
        pick = tree.sampler["stats"]["answer_leaf"]
        finished = [n for n in tree.nodes[1:] if n.finished]
        assert tree.nodes[pick].finished and tree.nodes[pick].scores["search_pick"] == 1.0
        assert tree.nodes[pick].scores["search_value"] == max(n.scores["search_value"] for n in finished)
    # every step batch holds the beams of every tree still searching
    assert {r.group for r in recording.batches[0]} == {t.problem_id for t in trees}


@pytest.mark.slow
def test_dvts_follows_the_best_of_m_in_each_subtree(engine):
    s = DVTSSettings(n=8, width=4, max_response_tokens=128, seed=2)
    trees = list(DVTSSampler(s, ArithCheckerScorer()).grow(engine, trees_for(engine, arith_problems("validation", 5))))
    for tree in trees:
        assert len(tree.children(0)) == s.n
        assert {c.scores["subtree"] for c in tree.children(0)} == {0, 1}
        for node in tree.nodes:
            children = tree.children(node.id)
            if not children or node.id == 0:
                continue
            assert len(children) == s.width
            assert len({c.scores["subtree"] for c in children}) == 1
            siblings = [n for n in tree.children(node.parent) if n.scores["subtree"] == node.scores["subtree"]]
            best = max(siblings, key=lambda n: (n.scores["search_value"], -n.id))
            assert best.id == node.id  # a subtree only extends its best candidate
        ends = tree.sampler["stats"]["subtree_ends"]
        assert len(ends) == s.n // s.width and all(tree.nodes[e].finished for e in ends)


@pytest.mark.slow
def test_search_with_the_checker_fixes_greedy_mistakes(engine, greedy_failures):
    # Greedy decoding gets all eight wrong; steered by the exact checker, the searches recover most
    # (5 to 7 of 8 across seeds when written; some problems' right first step is nearly never sampled).
    beam = list(BeamSearchSampler(BeamSettings(n=16, width=4, max_response_tokens=128), ArithCheckerScorer())
                .grow(engine, trees_for(engine, greedy_failures)))
    dvts = list(DVTSSampler(DVTSSettings(n=16, width=4, max_response_tokens=128), ArithCheckerScorer())
                .grow(engine, trees_for(engine, greedy_failures)))
    assert right_picks(beam, greedy_failures) >= 3
    assert right_picks(dvts, greedy_failures) >= 3


@pytest.mark.slow
def test_best_of_n_generation_mode(engine, tmp_path):
    from treetune.launch.best_of_n import BestOfNArgs, evaluate_trees, sample
    from treetune.rewards.grading import Grader

    problems = arith_problems("validation", 4)
    args = BestOfNArgs(output_dir=str(tmp_path / "bon"), limit=4, n=4, max_tokens=96, generation="dvts",
                       scorer="arith_checker", search_width=2, selectors="search_pick,majority,first", subsamples=2)
    with Grader(processes=1) as grader:
        sample(args, engine, problems, PromptTemplate(style="bare"), grader)
        metrics = evaluate_trees(args, problems, grader)
    assert set(metrics["selectors"]) == {"search_pick", "majority", "first"}
    n_max = str(metrics["n_values"][-1])
    assert 0.0 <= metrics["selectors"]["search_pick"][n_max]["accuracy"] <= 1.0
    from treetune.rollouts.tree_io import read_trees

    trees = list(read_trees(tmp_path / "bon" / "trees"))
    assert len(trees) == 4 and all(t.sampler["name"] == "dvts" for t in trees)
    assert all(sum(l.scores.get("search_pick", 0) for l in t.leaves()) == 1 for t in trees)


def test_beam_search_on_the_hf_engine(tiny_policy_path):
    # the transformers fallback pads rows that stop early: no pad may leak into a step's tokens
    from treetune.rollouts.engines import HFEngine

    engine = HFEngine(tiny_policy_path)
    tokenizer = engine.tokenizer
    s = BeamSettings(n=4, width=2, max_response_tokens=96, seed=3)
    trees = list(BeamSearchSampler(s, ArithCheckerScorer()).grow(engine, trees_for(engine, arith_problems("validation", 3))))
    assert len(trees) == 3
    for tree in trees:
        for node in tree.nodes[1:]:
            assert tokenizer.pad_token_id not in node.token_ids
            assert len(node.logprobs) == len(node.token_ids)
            assert node.finished or node.text.endswith("\n")
        for leaf in tree.leaves():
            ids = [t for t in tree.path_token_ids(leaf.id) if t != tokenizer.eos_token_id]
            assert tokenizer.decode(ids) == tree.path_text(leaf.id)
