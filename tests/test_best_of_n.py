"""Best-of-N: selectors and pass@k by hand, and launch/best_of_n.py end to end on real data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from treetune.rewards.evaluation.best_of_n import evaluate, sweep
from treetune.rewards.selection.selectors import SELECTORS, Candidate, get_selector, pass_at_k, register

ROOT = Path(__file__).resolve().parents[1]


def cand(answer, correct, cls, logprob=None):
    return Candidate(text=f"... {answer}", answer=answer, correct=correct, answer_class=cls, logprob_mean=logprob)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert math.isclose(pass_at_k(4, 1, 1), 0.25)
    assert math.isclose(pass_at_k(4, 1, 2), 1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert math.isclose(pass_at_k(5, 2, 3), 1 - math.comb(3, 3) / math.comb(5, 3))  # 0.9
    assert pass_at_k(3, 1, 3) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_selectors_by_hand():
    cands = [cand("5", False, 0, -0.2), cand("7", True, 1, -0.9), cand("7.0", True, 1, -0.5), cand(None, False, None, -0.1)]
    assert get_selector("first")(cands) == 0
    assert get_selector("majority")(cands) == 1  # "7" and "7.0" are one class
    assert get_selector("max_logprob")(cands) == 3
    tie = [cand("1", False, 0), cand("2", True, 1)]
    assert get_selector("majority")(tie) == 0  # ties go to the first seen
    assert get_selector("majority")([cand(None, False, None)]) is None
    with pytest.raises(KeyError, match="unknown selector"):
        get_selector("nope")


def test_registry_takes_new_selectors():
    @register("test_last")
    def last(cands):
        return len(cands) - 1 if cands else None

    try:
        assert get_selector("test_last")([cand("1", False, 0), cand("2", True, 1)]) == 1
        with pytest.raises(ValueError, match="already registered"):
            register("test_last")(last)
    finally:
        del SELECTORS["test_last"]


def test_evaluate_by_hand():
    per_problem = {
        "a": [cand("1", True, 0), cand("2", False, 1), cand("2", False, 1), cand("1", True, 0)],
        "b": [cand("3", False, 0), cand("4", True, 1), cand("3", False, 0), cand("3", False, 0)],
        "c": [],  # a prompt that did not fit: wrong everywhere
    }
    metrics = evaluate(per_problem, ["first", "majority"], sweep(4), subsamples=4, seed=0)
    assert sweep(4) == [1, 2, 4] and sweep(6) == [1, 2, 4, 6]
    full = metrics["selectors"]
    assert full["first"]["4"]["accuracy"] == pytest.approx(1 / 3)  # a right, b wrong, c wrong
    assert full["majority"]["4"]["accuracy"] == pytest.approx(1 / 3)  # a: tie 1 vs 2, first seen is 1
    assert full["majority"]["4"]["std"] == 0.0
    # pass@k over all samples: a has 2/4 right, b 1/4, c none
    assert metrics["pass_at_k"]["1"] == pytest.approx((0.5 + 0.25 + 0) / 3)
    assert metrics["pass_at_k"]["4"] == pytest.approx((1 + 1 + 0) / 3)
    # b has a right answer among its four but majority picks "3": a false positive of the selector
    assert full["majority"]["4"]["false_positive_rate"] == pytest.approx(1 / 2)


def _run(tmp_path, *extra):
    command = [sys.executable, str(ROOT / "launch" / "best_of_n.py"), "--output_dir", str(tmp_path), "--kv_cache_gb", "0.25", *extra]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.slow
def test_arith_run_matches_its_own_problem_file(tmp_path, tiny_policy_path):
    metrics = _run(tmp_path, "--config", str(ROOT / "configs" / "best_of_n" / "arith.yaml"), "--limit", "24", "--n", "8")
    assert metrics["n_values"] == [1, 2, 4, 8] and metrics["problems"] == 24
    rows = [json.loads(line) for line in (tmp_path / "problems.jsonl").open()]
    assert len(rows) == 24 and all(len(r["samples"]) == 8 for r in rows)
    # Recompute N = 8 (every sample, no subsampling) from the per-problem file alone.
    for name in ("first", "majority", "max_logprob"):
        picked = [r["selected"][name] for r in rows]
        right = sum(1 for r, i in zip(rows, picked) if i is not None and r["samples"][i]["correct"]) / len(rows)
        assert metrics["selectors"][name]["8"]["accuracy"] == pytest.approx(right)
    any_right = sum(any(s["correct"] for s in r["samples"]) for r in rows) / len(rows)
    assert metrics["pass_at_k"]["8"] == pytest.approx(any_right)
    # majority really votes: its pick belongs to the largest answer class
    for r in rows:
        classes = [s["answer_class"] for s in r["samples"] if s["answer_class"] is not None]
        if classes:
            top = max(classes.count(c) for c in set(classes))
            assert classes.count(r["samples"][r["selected"]["majority"]]["answer_class"]) == top
    assert (tmp_path / "accuracy_vs_n.png").stat().st_size > 10_000
    assert "| majority |" in (tmp_path / "summary.md").read_text()
    # a second run on the same folder samples nothing new and gives the same numbers
    again = _run(tmp_path, "--config", str(ROOT / "configs" / "best_of_n" / "arith.yaml"), "--limit", "24", "--n", "8")
    assert again == metrics


@pytest.mark.parametrize("source, file, groups", [
    ("gsm8k", "gsm8k/test.jsonl", ""),
    ("math500", "math500/test.jsonl", "level,subject"),
])
@pytest.mark.slow
def test_real_data_end_to_end(tmp_path, tiny_policy_path, shared_data, source, file, groups):
    metrics = _run(tmp_path, "--source", source, "--data_path", str(shared_data / file), "--limit", "12", "--n", "4",
                   "--max_tokens", "64", "--group_by", groups)
    rows = [json.loads(line) for line in (tmp_path / "problems.jsonl").open()]
    assert len(rows) == 12 and metrics["problems"] == 12
    for row in rows:
        assert len(row["samples"]) == 4 and isinstance(row["gold"], str)
        assert all(isinstance(s["correct"], bool) for s in row["samples"])
    for name in ("first", "majority", "max_logprob"):
        assert 0.0 <= metrics["selectors"][name]["4"]["accuracy"] <= metrics["pass_at_k"]["4"] + 1e-9
    if groups:
        assert set(metrics["groups"]) == {"level", "subject"}
        assert sum(e["problems"] for e in metrics["groups"]["level"].values()) == 12


def test_existing_trees_and_wandb_offline(tmp_path, monkeypatch):
    # Trees written by another run (here by hand, from gold and altered solutions) are evaluated
    # as they are, and the run is logged to wandb (offline: files only).
    from treetune.data.arith import arith_problems
    from treetune.launch.best_of_n import BestOfNArgs, evaluate_trees
    from treetune.rewards.grading import Grader
    from treetune.rollouts.tree import ReasoningTree
    from treetune.rollouts.tree_io import TreeWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    problems = arith_problems("test", 5)
    with TreeWriter(tmp_path / "given") as writer:
        for p in problems:
            tree = ReasoningTree(problem_id=p.id, prompt=p.question + "\n", prompt_ids=[1], answer=p.answer)
            wrong = p.solution.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{int(p.answer) + 1}}}")
            for text in (p.solution, wrong, wrong):
                tree.add(0, text, [1, 2], [-0.5, -0.5], "boxed")
            writer.write(tree)
    args = BestOfNArgs(output_dir=str(tmp_path / "eval"), trees_path=str(tmp_path / "given"), limit=5,
                       report_to="wandb", subsamples=2)
    with Grader() as grader:
        metrics = evaluate_trees(args, problems, grader)
    assert metrics["selectors"]["first"]["3"]["accuracy"] == 1.0  # the gold solution comes first
    assert metrics["selectors"]["majority"]["3"]["accuracy"] == 0.0  # two wrong votes beat one
    assert metrics["selectors"]["majority"]["3"]["false_positive_rate"] == 1.0
    assert metrics["pass_at_k"]["1"] == pytest.approx(1 / 3)
    assert list((tmp_path / "eval" / "wandb").glob("offline-run-*"))
