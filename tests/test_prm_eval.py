"""ProcessBench metric, step-scorer interface on the arith checker, and PRM data formats."""

from __future__ import annotations

import pytest
from treetune.data.arith import arith_problems
from treetune.data.steps import split_steps
from treetune.rewards.evaluation.processbench import (
    evaluate_splits,
    first_below,
    load_processbench,
    processbench_metrics,
)
from treetune.rewards.labels.formats import from_math_shepherd, read_stepwise, write_stepwise
from treetune.rewards.scorers.arith_checker import ArithCheckerScorer
from treetune.rollouts.scoring import aggregate


def test_processbench_metric_by_hand():
    assert first_below([0.9, 0.6, 0.2, 0.1], 0.5) == 2 and first_below([0.9, 0.8], 0.5) == -1
    m = processbench_metrics(predictions=[2, -1, 1, -1, -1], labels=[2, 3, 1, -1, -1])
    # erroneous: 2 of 3 located exactly; correct: 2 of 2 said -1
    assert m["acc_err"] == pytest.approx(2 / 3) and m["acc_corr"] == 1.0
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))


@pytest.mark.parametrize("split, size", [("gsm8k", 400), ("math", 1000)])
def test_trivial_predictor_on_the_real_files(shared_data, split, size):
    rows = load_processbench(shared_data / "processbench" / f"{split}.json")
    assert len(rows) == size
    everything_right = [[1.0] * len(r["steps"]) for r in rows]
    result = evaluate_splits({split: everything_right}, {split: [r["label"] for r in rows]}, thresholds=[0.5])
    metrics = result["0.5"]["splits"][split]
    assert metrics["acc_corr"] == 1.0 and metrics["acc_err"] == 0.0 and metrics["f1"] == 0.0
    assert metrics["erroneous"] + metrics["correct"] == size and metrics["erroneous"] > 0


def test_bad_processbench_label_is_named(tmp_path):
    path = tmp_path / "pb.jsonl"
    path.write_text('{"problem": "p", "steps": ["a", "b"], "label": 5}\n')
    with pytest.raises(ValueError, match=r"pb.jsonl:1: field 'label'"):
        load_processbench(path)


def test_checker_as_step_scorer_and_aggregations():
    problem = arith_problems("test", 1)[0]
    steps = split_steps(problem.solution, "line")
    broken = list(steps)
    broken[1] = broken[1].replace("=", "=1")
    scores = ArithCheckerScorer().score([problem.question] * 2, [steps, broken])
    assert scores[0] == [1.0] * len(steps)
    assert scores[1] == [1.0] + [0.0] * (len(steps) - 1)
    assert aggregate([0.9, 0.5, 0.8], "last") == 0.8 and aggregate([0.9, 0.5, 0.8], "min") == 0.5
    assert aggregate([0.5, 0.5], "product") == 0.25 and aggregate([0.2, 0.4], "mean") == pytest.approx(0.3)
    assert aggregate([], "last") == 0.0
    with pytest.raises(ValueError):
        aggregate([1.0], "median")


def test_math_shepherd_samples(shared_data):
    records = read_stepwise(shared_data / "prm_samples" / "samples_math-shepherd.jsonl", "math_shepherd")
    assert len(records) == 7
    first = records[0]
    assert first["prompt"].startswith("Janet pays $40/hour") and first["completions"][0].startswith("Step 1:")
    assert len(first["completions"]) == len(first["labels"]) == 5
    assert all(isinstance(l, bool) for r in records for l in r["labels"])
    assert any(not l for r in records for l in r["labels"])  # some steps are marked wrong


def test_prm800k_samples(shared_data):
    records = read_stepwise(shared_data / "prm_samples" / "samples_prm800k.jsonl", "prm800k")
    assert len(records) == 6
    first = records[0]
    assert first["prompt"].startswith("Three pencils and a jumbo eraser")
    assert first["labels"][0] is True
    assert all(len(r["completions"]) == len(r["labels"]) > 0 for r in records)


def test_trl_round_trip(tmp_path):
    records = [{"prompt": "1+1?", "completions": ["1+1=2", "The answer is 2"], "labels": [True, 0.75]}]
    assert write_stepwise(records, tmp_path / "s.jsonl") == 1
    assert read_stepwise(tmp_path / "s.jsonl") == records
    with pytest.raises(ValueError, match="2 steps but 1 labels"):
        write_stepwise([{"prompt": "p", "completions": ["a", "b"], "labels": [True]}], tmp_path / "t.jsonl")


def test_shepherd_row_without_tag_labels_is_an_error():
    with pytest.raises(ValueError, match="field 'label'"):
        from_math_shepherd({"input": "Q Step 1: a ки", "label": "Q Step 1: a x"}, "row.jsonl", 3)


def test_prm_selectors_by_hand():
    from treetune.rewards.selection.selectors import Candidate, get_selector

    cands = [Candidate("a", "1", False, 0, scores={"prm": [0.9, 0.2, 0.9]}),
             Candidate("b", "2", True, 1, scores={"prm": [0.6, 0.6, 0.7]}),
             Candidate("c", "3", False, 2, scores={"prm": [0.95, 0.95, 0.5]})]
    assert get_selector("prm_last")(cands) == 0  # last steps: 0.9 > 0.7 > 0.5
    assert get_selector("prm_min")(cands) == 1  # 0.6
    assert get_selector("prm_product")(cands) == 2  # 0.45 > 0.252 > 0.162
    assert get_selector("prm_last")([Candidate("x", None, False, None)]) is None


def test_eval_prm_with_the_checker_on_arith_trees(tmp_path):
    # The checker scored against its own truth: a perfect F1, which the whole path must reproduce.
    from treetune.launch.eval_prm import EvalPRMArgs, run
    from treetune.rollouts.tree import ReasoningTree
    from treetune.rollouts.tree_io import TreeWriter

    with TreeWriter(tmp_path / "trees") as writer:
        for p in arith_problems("test", 10):
            tree = ReasoningTree(problem_id=p.id, prompt=p.question + "\n", prompt_ids=[1], answer=p.answer,
                                 problem={"question": p.question, **p.extra})
            steps = split_steps(p.solution, "line")
            wrong = list(steps)
            wrong[0] = wrong[0].replace("=", "=9")
            for text in ("\n".join(steps), "\n".join(wrong)):
                tree.add(0, text, [1], [-0.1], "eos")
            writer.write(tree)
    metrics = run(EvalPRMArgs(output_dir=str(tmp_path / "eval"), scorer="arith_checker", arith_trees=str(tmp_path / "trees"),
                              thresholds="0.5"))
    arith = metrics["best"]["splits"]["arith"]
    assert (arith["acc_err"], arith["acc_corr"], arith["f1"]) == (1.0, 1.0, 1.0)
    assert arith["erroneous"] == 10 and arith["correct"] == 10
