"""Distributed proof: real DPO training under `accelerate launch` with 2 processes on the CPU.

DDP over gloo, DeepSpeed ZeRO-2 and ZeRO-3 (the real engine on DeepSpeed's CPU accelerator), each
run through `treetune.trainers.distributed_check` with the configs GPU users use, plus this
machine's overrides (`launch_command`). The first run on a fresh machine also builds DeepSpeed's
shared-memory comm op (about a minute, cached afterwards).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"
LN2 = math.log(2)


def _launch(config: str, out: Path, policy: str, *flags: str) -> list[dict]:
    """Run the check with 2 processes; return both ranks' records."""
    from treetune.trainers.distributed import launch_command

    command = launch_command(ACCELERATE / config, ["treetune.trainers.distributed_check", "--output_dir", str(out),
                                                    "--model_name_or_path", policy, *flags],
                             num_processes=2, python_module=True)
    env = dict(os.environ, TREETUNE_LOG="WARNING", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    records = [json.loads((out / "distributed" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["process_index"] for r in records] == [0, 1]
    return records


def _assert_trained_together(records: list[dict], steps: int) -> None:
    """Both ranks saw a 2-process gloo group, took every step, agree on losses and on the final weights."""
    for record in records:
        assert record["world_size"] == 2 and record["num_processes"] == 2 and record["backend"] == "gloo"
        assert record["global_step"] == steps
        losses = [record["losses"][str(s)] for s in range(1, steps + 1)]
        assert all(math.isfinite(x) for x in losses)
        assert losses[0] == pytest.approx(LN2, abs=1e-4)  # policy == reference at step 1
        assert losses[-1] < LN2 - 0.05, losses  # and it learns (the pairs repeat each epoch)
        assert record["reward_margins"][str(steps)] > 0
    # Gradients were reduced across ranks: separate trainings on separate shards would diverge.
    assert records[0]["weights_checksum"] == records[1]["weights_checksum"]
    assert records[0]["losses"] == records[1]["losses"]


def _assert_full_model(out: Path, policy: str, checksum: float) -> None:
    """The saved model loads with transformers: full tensors (no ZeRO-3 placeholders), moved by training."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(policy)
    saved = load_file(str(out / "model.safetensors"))
    for name, param in before.state_dict().items():
        if name in saved:
            assert saved[name].shape == param.shape, name
    assert all(t.numel() > 0 for t in saved.values())
    mine, theirs = dict(trained.named_parameters()), dict(before.named_parameters())
    assert mine.keys() == theirs.keys()
    assert any((mine[k] - theirs[k]).abs().max() > 0 for k in mine)
    # The file holds what the ranks held at the end of training (same sum of squares, gathered).
    total = sum(float(p.detach().double().pow(2).sum()) for p in trained.parameters())
    assert total == pytest.approx(checksum, rel=1e-6)
    assert (out / "tokenizer.json").exists()


SHORT = ("--max_steps", "4", "--num_pairs", "8")  # 2 steps an epoch at 2 x 2 pairs a step


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_policy_path) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    return out, _launch("ddp.yaml", out, tiny_policy_path, *SHORT)


def test_cpu_launches_get_a_gloo_backend(monkeypatch):
    """The patched detection: a launched process on a CPU-only machine is MULTI_CPU over gloo."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from treetune.trainers.distributed import enable_cpu_distributed, has_accelerator

    if has_accelerator():
        pytest.skip("with an accelerator the patch is a no-op by design")
    assert enable_cpu_distributed() and enable_cpu_distributed()
    detect = PartialState._prepare_backend
    wrapped = inspect.getclosurevars(detect).nonlocals["stock"]
    assert not hasattr(wrapped, "_treetune_cpu_distributed")  # idempotent: accelerate's own, wrapped once
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert detect(None) == (None, DistributedType.NO)  # a plain `python script.py` stays single-process
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert detect(None) == ("gloo", DistributedType.MULTI_CPU)
    assert detect(None, backend="gloo") == ("gloo", DistributedType.MULTI_CPU)
    assert detect(None, cpu=True)[1] == DistributedType.MULTI_CPU  # accelerate's own --cpu path, untouched


@pytest.mark.slow
def test_ddp_over_gloo(ddp_run, tiny_policy_path):
    out, records = ddp_run
    for record in records:
        assert record["distributed_type"] == "MULTI_CPU"
        assert record["model_wrapper"] == "DistributedDataParallel"
    _assert_trained_together(records, steps=4)
    _assert_full_model(out, tiny_policy_path, records[0]["weights_checksum"])


@pytest.mark.slow
def test_deepspeed_zero2(tmp_path, tiny_policy_path, ddp_run):
    out = tmp_path / "zero2"
    records = _launch("zero2.yaml", out, tiny_policy_path, *SHORT, "--save_strategy", "steps", "--save_steps", "4")
    for record in records:
        assert record["distributed_type"] == "DEEPSPEED" and record["model_wrapper"] == "DeepSpeedEngine"
        assert record["deepspeed_accelerator"] == "cpu" and record["zero_stage"] == 2
        # TRL keeps the reference model whole below stage 3: a DeepSpeed inference engine at stage 0.
        assert record["ref_model_wrapper"] == "DeepSpeedEngine" and record["ref_zero_stage"] == 0
    _assert_trained_together(records, steps=4)
    # DeepSpeed's checkpoint format: one optimizer-state shard per rank (ZeRO-2 partitions them).
    step_dir = out / "checkpoint-4" / "global_step4"
    assert (out / "checkpoint-4" / "latest").read_text().strip() == "global_step4"
    assert {p.name for p in step_dir.glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    _assert_full_model(out, tiny_policy_path, records[0]["weights_checksum"])
    # Same data, same global batch: ZeRO-2 computes the same optimisation as DDP, only sharded.
    ddp = ddp_run[1][0]
    for step, loss in ddp["losses"].items():
        assert records[0]["losses"][step] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert records[0]["weights_checksum"] == pytest.approx(ddp["weights_checksum"], rel=1e-6)


@pytest.mark.slow
def test_deepspeed_zero3_resume_and_vllm(tmp_path, tiny_policy_path):
    flags = ("--max_steps", "5", "--num_pairs", "12", "--save_strategy", "steps", "--save_steps", "2")
    full = _launch("zero3.yaml", tmp_path / "full", tiny_policy_path, *flags)
    for record in full:
        assert record["distributed_type"] == "DEEPSPEED" and record["zero_stage"] == 3
        # Weights sharded over the 2 ranks, the reference model too (TRL prepares it at stage 3).
        assert record["policy_local_share"] == pytest.approx(0.5, abs=0.05)
        assert record["ref_model_wrapper"] == "DeepSpeedEngine" and record["ref_zero_stage"] == 3
        assert record["ref_local_share"] == pytest.approx(0.5, abs=0.05)
    _assert_trained_together(full, steps=5)
    shards = {p.name for p in (tmp_path / "full" / "checkpoint-2" / "global_step2").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")} <= shards
    _assert_full_model(tmp_path / "full", tiny_policy_path, full[0]["weights_checksum"])

    # Resume mid-epoch (3 steps an epoch) from step 2 in fresh processes: steps 3-5 again, same result.
    resumed = _launch("zero3.yaml", tmp_path / "resumed", tiny_policy_path, *flags,
                      "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-2"))
    for record in resumed:
        assert record["steps_this_run"] == 3 and record["global_step"] == 5
        for step in ("3", "4", "5"):
            assert record["losses"][step] == pytest.approx(full[0]["losses"][step], rel=1e-5)
        assert record["weights_checksum"] == pytest.approx(full[0]["weights_checksum"], rel=1e-9)

    # The gathered ZeRO-3 checkpoint serves in vLLM as it is, and still solves arith problems.
    from treetune.data import PromptTemplate
    from treetune.data.arith import arith_problems, check_solution
    from treetune.rollouts.engines.base import GenerationRequest, SamplingSettings
    from treetune.rollouts.engines.vllm_engine import VLLMEngine

    problems = arith_problems("test", limit=16)

    def solved_by(model: str) -> tuple[int, list[str]]:
        with VLLMEngine(model, kv_cache_gb=0.25) as engine:
            template = PromptTemplate(style="bare")
            greedy = SamplingSettings(temperature=0, max_tokens=96)
            results = engine.generate([GenerationRequest(template.render_ids(p.question, engine.tokenizer), greedy)
                                       for p in problems])
        texts = [r.completions[0].text for r in results]
        return sum(check_solution(p, t) == -1 for p, t in zip(problems, texts)), texts

    # measured against the starting policy: its build stops at a held-out accuracy, not a fixed model
    solved, texts = solved_by(str(tmp_path / "full"))
    at_start, _ = solved_by(str(tiny_policy_path))
    assert solved >= max(1, at_start // 2), (solved, at_start, texts[:3])
