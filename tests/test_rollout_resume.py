"""launch/rollout.py end to end: killed mid-run, started again, every tree once and only once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _count_trees(folder: Path) -> int:
    return sum(f.read_bytes().count(b"\n") for f in folder.glob("trees-*.jsonl"))


def test_killed_run_resumes_without_duplicates(tmp_path, tiny_policy_path):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "launch" / "rollout.py"), "--config", str(ROOT / "configs" / "rollout" / "treepo.yaml"),
               "--output_dir", str(out), "--limit", "24", "--batch_problems", "3", "--trajectories", "4",
               "--shard_size", "5", "--kv_cache_gb", "0.25"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and _count_trees(out / "trees") < 7 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    import os

    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, vLLM's workers included
    proc.wait()
    written = _count_trees(out / "trees")
    assert 7 <= written < 24
    # A torn write, as a kill during `write` would leave it.
    shards = sorted((out / "trees").glob("trees-*.jsonl"))
    with shards[-1].open("a") as handle:
        handle.write('{"schema_version": 1, "problem_id": "arith-test-')

    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "incompletely written" in completed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["problems"] == 24 and metrics["new_trees"] == 24 - written
    ids = [json.loads(line)["problem_id"] for f in sorted((out / "trees").glob("trees-*.jsonl")) for line in f.open()]
    assert len(ids) == 24 and len(set(ids)) == 24
    assert metrics["trajectories"] == 24 * 4
    assert 0.0 <= metrics["trajectory_accuracy"] <= 1.0 and "prefix_cache_hit_rate" in metrics
