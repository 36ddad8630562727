"""launch/rollout.py end to end: killed mid-run, started again, every tree once and only once.

The first run is the job itself with one hook: after its 7th tree is written (flushed and
fsync'ed), the child tells the test through a pipe and waits; the test then kills the whole
process group. The kill lands at a known point, so exactly 7 trees are on disk, whatever the speed
of the machine.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STOP_AFTER = 7

# The job (`treetune.launch.rollout.main`) with a writer that reports its STOP_AFTER-th tree and then
# holds the run still until it is killed. argv: stop_after, pipe fd, the job's own arguments.
CHILD = """
import os, signal, sys

from treetune.launch import rollout
from treetune.rollouts.tree_io import TreeWriter

stop_after, report = int(sys.argv[1]), int(sys.argv[2])
write, written = TreeWriter.write, []


def write_and_report(self, tree):
    write(self, tree)
    written.append(tree.problem_id)
    if len(written) == stop_after:
        os.write(report, f"{len(written)}\\n".encode())
        while True:
            signal.pause()


TreeWriter.write = write_and_report
rollout.main(sys.argv[3:])
"""


def _tree_lines(folder: Path) -> list[bytes]:
    return [line for f in sorted(folder.glob("trees-*.jsonl")) for line in f.read_bytes().splitlines(keepends=True)]


def test_killed_run_resumes_without_duplicates(tmp_path, tiny_policy_path):
    out = tmp_path / "run"
    job = ["--config", str(ROOT / "configs" / "rollout" / "treepo.yaml"), "--output_dir", str(out), "--limit", "24",
           "--batch_problems", "3", "--trajectories", "4", "--shard_size", "5", "--kv_cache_gb", "0.25"]
    read_end, write_end = os.pipe()
    log = tmp_path / "first_run.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(STOP_AFTER), str(write_end), *job], cwd=ROOT,
                                pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 900)
        report = os.read(read_end, 64) if ready else b""
    finally:
        os.close(read_end)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, vLLM's engine process included
        proc.wait()
    # an empty report: the child ended (or hung) before its 7th tree
    assert report == f"{STOP_AFTER}\n".encode(), log.read_text()[-3000:]
    before = _tree_lines(out / "trees")
    assert len(before) == STOP_AFTER and all(line.endswith(b"\n") for line in before)
    # A torn write, as a kill during `write` would leave it.
    shards = sorted((out / "trees").glob("trees-*.jsonl"))
    assert len(shards) == 2  # 5 trees a shard
    with shards[-1].open("a") as handle:
        handle.write('{"schema_version": 1, "problem_id": "arith-test-')

    completed = subprocess.run([sys.executable, str(ROOT / "launch" / "rollout.py"), *job], cwd=ROOT,
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "incompletely written" in completed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["problems"] == 24 and metrics["new_trees"] == 24 - STOP_AFTER
    after = _tree_lines(out / "trees")
    assert after[:STOP_AFTER] == before  # the finished trees are kept as they were, not sampled again
    ids = [json.loads(line)["problem_id"] for line in after]
    assert len(ids) == 24 and len(set(ids)) == 24
    assert metrics["trajectories"] == 24 * 4
    assert 0.0 <= metrics["trajectory_accuracy"] <= 1.0 and "prefix_cache_hit_rate" in metrics
