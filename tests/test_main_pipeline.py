"""The README's main job (launch/main.py) at a reduced size: every stage's output and the report,
then a resume that redoes only the stage whose marker is gone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--eval_problems", "12", "--bon_problems", "6", "--n", "4", "--train_problems", "10", "--trajectories", "8",
         "--prm_trees", "4", "--prm_k", "2", "--prm_epochs", "1"]


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


def test_every_stage_leaves_its_output(finished: Path):
    from treetune.rollouts.tree_io import read_trees

    for stage in ("policy", "eval_before", "trees", "prm_labels", "prm", "pairs", "step_dpo", "eval_after", "report"):
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


def test_report_holds_the_table_plot_and_artefacts(finished: Path):
    report = (finished / "report" / "report.md").read_text()
    for row in ("| greedy |", "| majority@4 |", "| pass@4 |", "| PRM best-of-4 (last step) |"):
        assert row in report
    assert "saved** by shared prefixes" in report
    assert str(finished / "pairs" / "pairs.jsonl") in report and "launch/step_dpo.py" in report
    figures = json.loads((finished / "report" / "report.json").read_text())
    for entry in figures["table"].values():
        assert 0.0 <= entry["before"] <= 1.0 and 0.0 <= entry["after"] <= 1.0
    assert figures["table"]["pass@4"]["before"] >= figures["table"]["majority@4"]["before"]
    assert 0.0 < figures["tokens_saved_share"] < 1.0
    assert (finished / "report" / "accuracy_vs_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_resumes_at_the_missing_stage(finished: Path):
    kept = {stage: (finished / stage / "stage.json").read_text() for stage in ("trees", "step_dpo", "eval_after")}
    (finished / "report" / "stage.json").unlink()
    (finished / "report" / "report.md").unlink()
    done = run_main(finished)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (finished / "report" / "report.md").exists()
    for stage, text in kept.items():
        assert (finished / stage / "stage.json").read_text() == text, f"{stage} was redone"
