"""The README's main job (launch/main.py) at a reduced size: every stage's output, the fused PRM and
its F1 against the exact checker in the report, then a resume that redoes only the stage whose
marker is gone. The recipe's help text and the report's PRM paragraph are checked without a run."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from treetune.launch.main import MainArgs
from treetune.launch.main_report import describe_prm, prm_f1_on_samples
from treetune.rewards.scorers.arith_checker import ArithCheckerScorer

ROOT = Path(__file__).resolve().parents[1]
# 10 trees x 8 trajectories give ~40 consensus-labelled solutions; 30% of them held out leave the
# fusion fit some dozens of steps with both labels.
SMALL = ["--eval_problems", "12", "--bon_problems", "6", "--n", "4", "--train_problems", "10", "--trajectories", "8",
         "--prm_trees", "10", "--prm_k", "2", "--prm_epochs", "1", "--prm_fusion_holdout", "0.3", "--rl_steps", "2"]


def run_main(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/main.py", "--config", "configs/main/arith.yaml", "--output_dir", str(out), *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("main") / "run"
    done = run_main(out)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_recipe_field_has_help():
    missing = [f.name for f in fields(MainArgs) if not f.metadata.get("help")]
    assert not missing, f"MainArgs fields without help: {missing}"
    shown = subprocess.run([sys.executable, "launch/main.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "--prm_fusion" in shown.stdout and "likelihood of each step" in " ".join(shown.stdout.split())


def test_the_report_names_the_prm():
    fused = {"kind": "fused", "records": 900, "epochs": 3.0, "threshold": 0.7, "fusion_records": 100,
             "fusion": {"features": ["head_logit", "step_min_logp"], "weights": [0.5, 1.25], "bias": 0.1, "fit_steps": 240,
                        "fit_loss": 0.31, "prior_loss": 0.6},
             "held_out": {"solutions": 100, "f1": 0.74}}
    text = describe_prm(fused)
    assert text.startswith("**PRM: the fused PRM: separator head + the backbone's likelihood of each step.**")
    assert "240 steps of 100 solutions held out" in text and "below 0.7" in text and "step_min_logp +1.25" in text
    head = describe_prm({"kind": "head", "records": 1000, "epochs": 4.0, "threshold": 0.5})
    assert "the separator head alone" in head and "below 0.5" in head and "fusion" in head


@pytest.mark.slow
def test_every_stage_leaves_its_output(finished: Path):
    from treetune.rollouts.tree_io import read_trees

    for stage in ("policy", "eval_before", "trees", "prm_labels", "treepo", "eval_treepo", "prm", "pairs", "step_dpo",
                  "eval_after", "report"):
        assert (finished / stage / "stage.json").exists(), stage
    greedy = json.loads((finished / "eval_before" / "greedy_metrics.json").read_text())
    assert greedy["problems"] == 12
    assert len(list(read_trees(finished / "eval_before" / "trees"))) == 6
    trees = list(read_trees(finished / "trees" / "trees"))
    assert len(trees) == 10 and all(len(t.leaves()) == 8 for t in trees)
    assert all("outcome" in leaf.scores for t in trees for leaf in t.leaves())
    labels = lines(finished / "prm_labels" / "labels.jsonl")
    assert labels and all(len(r["completions"]) == len(r["labels"]) for r in labels)
    assert (finished / "prm" / "model" / "config.json").exists()
    pairs = lines(finished / "pairs" / "pairs.jsonl")
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert (finished / "step_dpo" / "model" / "model.safetensors").exists()
    after = json.loads((finished / "eval_after" / "stage.json").read_text())
    assert after["model"] == str(finished / "step_dpo" / "model")


@pytest.mark.slow
def test_the_online_arm_trains_and_is_evaluated_like_the_offline_one(finished: Path):
    from transformers import AutoModelForCausalLM

    rl = json.loads((finished / "treepo" / "stage.json").read_text())
    assert rl["steps"] == 2 and rl["sampler"] == "treepo" and rl["advantage"] == "subgroup"
    assert rl["trees"] == 2 * 16 and rl["trajectories"] == 2 * 16 * 8  # 16 trees of 8 leaves a step
    assert 0 < rl["decoded_share_of_rows"] < 1  # shared prefixes decoded once
    assert "launch/treepo.py" in rl["command"] and "--max_steps 2" in rl["command"]
    AutoModelForCausalLM.from_pretrained(rl["model"])  # a plain checkpoint
    evaluated = json.loads((finished / "eval_treepo" / "stage.json").read_text())
    assert evaluated["model"] == rl["model"]
    assert json.loads((finished / "eval_treepo" / "greedy_metrics.json").read_text())["problems"] == 12
    figures = json.loads((finished / "report" / "report.json").read_text())
    assert figures["arms"] == {"after": "after Step-DPO", "treepo": "after TreePO RL"}
    assert all(0.0 <= entry["treepo"] <= 1.0 for entry in figures["table"].values())
    report = (finished / "report" / "report.md").read_text()
    assert "| metric | before | after Step-DPO | after TreePO RL |" in report and "## Online arm: TreePO RL" in report


@pytest.mark.slow
def test_the_prm_stage_trains_the_fused_prm(finished: Path):
    prm = json.loads((finished / "prm" / "stage.json").read_text())
    assert prm["kind"] == "fused"
    fusion = json.loads((finished / "prm" / "model" / "fusion.json").read_text())
    assert fusion["features"] == prm["fusion"]["features"] and fusion["weights"] == prm["fusion"]["weights"]
    assert "--likelihood_fusion true" in prm["command"]
    # the threshold is chosen on the solutions held out from the head, from the F1 sweep's grid
    assert 0.0 < prm["threshold"] < 1.0 and round(prm["threshold"] / 0.05, 6).is_integer()
    assert prm["held_out"]["solutions"] == prm["fusion_records"] > 0
    assert prm["held_out"]["erroneous"] + prm["held_out"]["correct"] == prm["held_out"]["solutions"]


@pytest.mark.slow
def test_report_holds_the_table_plot_and_artefacts(finished: Path):
    report = (finished / "report" / "report.md").read_text()
    for row in ("| greedy |", "| majority@4 |", "| pass@4 |", "| PRM best-of-4 (min step) |", "| PRM best-of-4 (last step) |",
                "| PRM F1 against the exact checker (threshold "):
        assert row in report
    assert "The PRM rows use the fused PRM" in report and "**PRM: the fused PRM" in report
    assert "saved** by shared prefixes" in report
    assert str(finished / "pairs" / "pairs.jsonl") in report and "launch/step_dpo.py" in report
    figures = json.loads((finished / "report" / "report.json").read_text())
    for entry in figures["table"].values():
        assert 0.0 <= entry["before"] <= 1.0 and 0.0 <= entry["after"] <= 1.0
    assert figures["table"]["pass@4"]["before"] >= figures["table"]["majority@4"]["before"]
    assert figures["prm"]["kind"] == "fused"
    assert 0.0 < figures["tokens_saved_share"] < 1.0
    assert (finished / "report" / "accuracy_vs_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_f1_is_against_the_exact_checker(finished: Path):
    # The same F1 code scores the checker itself perfectly on the same samples (when they hold
    # both right and wrong solutions), and the report's F1 counts every sampled solution.
    figures = json.loads((finished / "report" / "report.json").read_text())
    trees = str(finished / "eval_before" / "trees")
    checker = prm_f1_on_samples(ArithCheckerScorer(), trees, 0.5)
    assert checker["erroneous"] > 0 and checker["correct"] > 0
    assert checker["f1"] == 1.0 and checker["acc_err"] == 1.0 and checker["acc_corr"] == 1.0
    before = figures["prm"]["f1_against_checker"]["before"]
    assert before["erroneous"] + before["correct"] == checker["erroneous"] + checker["correct"] > 0
    assert before["threshold"] == figures["prm"]["threshold"]


@pytest.mark.slow
def test_a_rerun_resumes_at_the_missing_stage(finished: Path):
    kept = {stage: (finished / stage / "stage.json").read_text() for stage in ("trees", "treepo", "step_dpo", "eval_after")}
    (finished / "report" / "stage.json").unlink()
    (finished / "report" / "report.md").unlink()
    done = run_main(finished)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (finished / "report" / "report.md").exists()
    for stage, text in kept.items():
        assert (finished / stage / "stage.json").read_text() == text, f"{stage} was redone"
