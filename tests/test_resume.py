"""The trainer scaffold: `resume_point`, the run files, the recipe vocabulary, and a resume with
`--resume_from_checkpoint auto` for each of the six trainers.

Each resume test runs a trainer for 4 steps with a checkpoint every 2, all with `auto` (so the first
run starts fresh), removes the step-4 checkpoint and the run files, as a run killed after its
step-2 save leaves its folder, then runs the very same command again. The second run must start
at step 2 from checkpoint-2 (which it leaves untouched: steps 1-2 are not trained again), log steps
3 and 4 once each, and end at step 4 with the losses the uninterrupted run had.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
from treetune.data.arith import arith_problems, check_solution
from treetune.data.bvpo_pairs import BVPOPair, write_bvpo_pairs
from treetune.data.step_pairs import StepPair, write_step_pairs
from treetune.data.steps import split_steps
from treetune.rewards.labels.formats import write_stepwise
from treetune.trainers.common import complete_checkpoints, resolved_recipe, resume_point, resumed_step, setup_logging

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
         "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--dataloader_num_workers", "0",
         "--resume_from_checkpoint", "auto"]


# ---------------------------------------------------------------- resume_point and the run files

def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_auto_is_the_newest_complete_checkpoint(tmp_path):
    assert resume_point(tmp_path / "nothing-yet", "auto") is None  # a first run: fresh start
    assert resume_point(tmp_path, "auto") is None
    _checkpoint(tmp_path, 9)
    newest = _checkpoint(tmp_path, 10)  # by step number, not by name
    _checkpoint(tmp_path, 12, complete=False)  # a save cut off by a kill: no trainer_state.json
    (tmp_path / "checkpoint-final").mkdir()  # not a checkpoint-N folder
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    for wanted in ("auto", "AUTO", "true", "last", True):
        assert resume_point(tmp_path, wanted) == str(newest)
    assert resumed_step(resume_point(tmp_path, "auto")) == 10 and resumed_step(None) == 0


def test_a_named_checkpoint_is_taken_as_given_and_false_starts_fresh(tmp_path):
    older = _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    assert resume_point(tmp_path, str(older)) == str(older)
    for fresh in (None, False, "", "false", "no", "None"):
        assert resume_point(tmp_path, fresh) is None
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        resume_point(tmp_path, str(tmp_path / "checkpoint-7"))


def test_the_resolved_recipe_reads_back_as_a_recipe(tmp_path):
    """recipe.json is flat, field by field: `--config recipe.json` reproduces the run's recipe."""
    from treetune.trainers.common import parse_recipe, write_recipe
    from treetune.trainers.sft.config import SFTScriptArguments
    from trl import ModelConfig, SFTConfig

    types = (SFTScriptArguments, SFTConfig, ModelConfig)
    parts = parse_recipe(types, ["--config", str(ROOT / "configs" / "sft" / "arith.yaml"), "--output_dir", str(tmp_path),
                                 "--use_peft", "true", "--lora_r", "4"])
    written = write_recipe(tmp_path, *parts)
    assert written["limit"] == 64000 and written["lora_r"] == 4 and written["learning_rate"] == 0.002
    again = parse_recipe(types, ["--config", str(tmp_path / "recipe.json")])
    assert json.loads(json.dumps(resolved_recipe(*again), default=str)) == json.loads((tmp_path / "recipe.json").read_text())


def test_every_trainer_recipe_field_has_help():
    from treetune.trainers.bvpo.config import BVPOConfig, BVPOScriptArguments
    from treetune.trainers.distributed_check import CheckArguments
    from treetune.trainers.mcts_dpo.config import MCTSDPOConfig
    from treetune.trainers.mcts_dpo.loop import MCTSDPOArgs
    from treetune.trainers.prm.config import PRMScriptArguments
    from treetune.trainers.qtuning.config import QTuningConfig
    from treetune.trainers.sft.config import SFTScriptArguments
    from treetune.trainers.step_dpo.config import StepDPOConfig, StepDPOScriptArguments
    from trl import ModelConfig

    recipes = (SFTScriptArguments, PRMScriptArguments, StepDPOScriptArguments, StepDPOConfig, MCTSDPOArgs, MCTSDPOConfig,
               BVPOScriptArguments, BVPOConfig, QTuningConfig, CheckArguments, ModelConfig)
    bare = [f"{cls.__name__}.{f.name}" for cls in recipes for f in dataclasses.fields(cls)
            if f.init and not f.metadata.get("help")]
    assert not bare, "recipe fields without help: " + ", ".join(bare)


def test_old_lora_switch_is_renamed_to_trl_vocabulary(tmp_path):
    from transformers import TrainingArguments
    from treetune.trainers.common import parse_recipe
    from treetune.trainers.prm.config import RENAMED, PRMScriptArguments
    from trl import ModelConfig

    with pytest.warns(FutureWarning, match="use_lora"):
        _, _, model_args = parse_recipe((PRMScriptArguments, TrainingArguments, ModelConfig),
                                        ["--use_lora", "true", "--output_dir", str(tmp_path)], RENAMED)
    assert model_args.use_peft


def test_logging_level_from_the_environment(monkeypatch):
    import logging

    monkeypatch.setenv("TREETUNE_LOG", "warning")
    setup_logging()
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("httpx").level == logging.WARNING
    setup_logging("INFO")
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("httpx").level == logging.WARNING  # chatter stays quiet at INFO
    with pytest.raises(ValueError, match="TREETUNE_LOG"):
        setup_logging("LOUD")


# ---------------------------------------------------------------- each trainer resumes with auto

def _losses(checkpoint: Path) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    steps = [h["step"] for h in history if "loss" in h]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _resume_twice(main, argv: list[str], out: Path, checkpoints: Path | None = None,
                  model: Path | None = None, kill=None) -> tuple[dict, dict]:
    """Run, cut the run back to its step-2 checkpoint, run the same command again; both metrics."""
    checkpoints, model = checkpoints or out, model or out
    main(list(argv))
    first = json.loads((model / "metrics.json").read_text())
    assert first["steps"] == 4 and first["resumed_from"] is None and first["resumed_step"] == 0
    whole = _losses(checkpoints / "checkpoint-4")
    assert sorted(whole) == [1, 2, 3, 4]

    shutil.rmtree(checkpoints / "checkpoint-4")  # killed after the step-2 save
    (model / "metrics.json").unlink()
    if kill is not None:
        kill()
    kept = {p: p.stat().st_mtime_ns for p in (checkpoints / "checkpoint-2").rglob("*")}
    main(list(argv))
    second = json.loads((model / "metrics.json").read_text())
    assert second["resumed_from"] == str(checkpoints / "checkpoint-2") and second["resumed_step"] == 2
    assert second["steps"] == 4
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # steps 1-2 were not trained (nor saved) again
    resumed = _losses(checkpoints / "checkpoint-4")
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed[1] == whole[1] and resumed[2] == whole[2]  # the history of steps 1-2, restored
    assert resumed[3] == pytest.approx(whole[3], rel=1e-4) and resumed[4] == pytest.approx(whole[4], rel=1e-4)
    assert (model / "recipe.json").exists() and (model / "model.safetensors").exists()
    return first, second


def _step_pairs(count: int) -> list[StepPair]:
    rng = random.Random(0)
    pairs = []
    for problem in arith_problems("train", limit=count):
        steps = [s + "\n" for s in problem.solution.split("\n")]
        k = rng.randrange(len(steps) - 1)
        lhs, result = steps[k].rstrip("\n").split("=")
        pairs.append(StepPair(prompt=problem.question, initial_reason_steps="".join(steps[:k]), chosen=steps[k],
                              rejected=f"{lhs}={int(result) + 1}\n", answer=problem.answer, problem_id=problem.id,
                              step_index=k))
    return pairs


@pytest.mark.slow
def test_sft_from_scratch_resumes(tmp_path):
    from treetune.trainers.sft.trainer import main

    out = tmp_path / "sft"
    argv = ["--source", "arith", "--limit", "64", "--prompt_style", "bare", "--num_hidden_layers", "1",
            "--per_device_train_batch_size", "8", "--max_length", "128", "--learning_rate", "0.002",
            "--output_dir", str(out), *STEPS]
    _, second = _resume_twice(main, argv, out)
    assert second["num_records"] == 64


@pytest.mark.slow
def test_prm_resumes(tmp_path, tiny_policy_path):
    from treetune.trainers.prm.trainer import main

    rng = random.Random(0)
    records = []
    for problem in arith_problems("train", 48):
        steps = split_steps(problem.solution, "line")
        if rng.random() < 0.5:
            i = rng.randrange(len(steps) - 1)
            steps[i] = steps[i].replace("=", "=1", 1)
        first = check_solution(problem, "\n".join(steps))
        records.append({"prompt": problem.question + "\n", "completions": steps,
                        "labels": [first == -1 or i < first for i in range(len(steps))]})
    write_stepwise(records, tmp_path / "labels.jsonl")
    out = tmp_path / "prm"
    argv = ["--train_file", str(tmp_path / "labels.jsonl"), "--max_length", "256", "--per_device_train_batch_size", "8",
            "--learning_rate", "0.001", "--output_dir", str(out), *STEPS]
    _, second = _resume_twice(main, argv, out)
    assert second["records"] == 48 and second["backbone"] == tiny_policy_path


@pytest.mark.slow
def test_step_dpo_resumes(tmp_path, tiny_policy_path):
    from treetune.trainers.step_dpo.trainer import main

    write_step_pairs(_step_pairs(24), tmp_path / "pairs.jsonl")
    out = tmp_path / "step_dpo"
    argv = ["--pairs", str(tmp_path / "pairs.jsonl"), "--beta", "0.5", "--learning_rate", "1e-4",
            "--per_device_train_batch_size", "4", "--max_length", "128", "--lr_scheduler_type", "constant",
            "--output_dir", str(out), *STEPS]
    _, second = _resume_twice(main, argv, out)
    assert second["pairs"] == 24 and second["policy"] == tiny_policy_path


@pytest.mark.slow
def test_bvpo_resumes(tmp_path, tiny_policy_path):
    from treetune.trainers.bvpo.trainer import main

    pairs = []
    for p in arith_problems("train", limit=16):
        wrong = str(int(p.answer) + 1)
        head = p.solution.rsplit("\n", 1)[0]
        pairs.append(BVPOPair(prompt=p.question, chosen=p.solution, rejected=f"{head}\nThe answer is \\boxed{{{wrong}}}",
                              mode="trace", problem_id=p.id, answer=p.answer))
        pairs.append(BVPOPair(prompt=p.question, chosen=f"The answer is \\boxed{{{p.answer}}}",
                              rejected=f"The answer is \\boxed{{{wrong}}}", mode="empty", problem_id=p.id, answer=p.answer))
    write_bvpo_pairs(pairs, tmp_path / "pairs.jsonl")
    out = tmp_path / "bvpo"
    argv = ["--pairs", str(tmp_path / "pairs.jsonl"), "--model_name_or_path", tiny_policy_path, "--prompt_style", "bare",
            "--beta", "0.5", "--learning_rate", "1e-4", "--per_device_train_batch_size", "4", "--max_length", "128",
            "--output_dir", str(out), *STEPS]
    _, second = _resume_twice(main, argv, out)
    assert second["rows"] == 16 and second["alpha_history"] == [0.5] * 4  # steps 1-2 restored, 3-4 new


@pytest.mark.slow
def test_qtuning_resumes(tmp_path):
    from treetune.trainers.qtuning.trainer import main

    out = tmp_path / "qtuning"
    argv = ["--config", str(ROOT / "configs" / "qtuning_sft" / "arith.yaml"), "--limit", "48",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--output_dir", str(out), *STEPS]
    first, second = _resume_twice(main, argv, out)
    assert second["totals"] == first["totals"]  # its own counters continue from the checkpoint too


@pytest.mark.slow
def test_mcts_dpo_round_training_resumes(tmp_path, tiny_policy_path):
    """A loop killed inside a round's training: the same command skips the search and the pairs and
    resumes the training from the round's newest checkpoint."""
    from treetune.trainers.mcts_dpo.loop import main

    out = tmp_path / "mcts_dpo"
    argv = ["--config", str(ROOT / "configs" / "mcts_dpo" / "arith.yaml"), "--output_dir", str(out), "--rounds", "1",
            "--problems_per_round", "12", "--mcts_iterations", "2", "--search_width", "2", "--eval_limit", "0",
            "--kv_cache_gb", "0.25", "--correct_only", "false", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-4", *STEPS]
    r0 = out / "round_0"
    trees = {}

    def kill() -> None:
        state = json.loads((r0 / "state.json").read_text())
        state["done"] = ["search", "pairs"]  # training had not finished
        (r0 / "state.json").write_text(json.dumps(state))
        trees.update({p: p.stat().st_mtime_ns for p in [*(r0 / "search").rglob("*.jsonl"), r0 / "pairs.jsonl"]})

    _, second = _resume_twice(main, argv, out, checkpoints=r0 / "train", model=r0 / "model", kill=kill)
    assert {p: p.stat().st_mtime_ns for p in trees} == trees  # search and pairs were not redone
    assert second["policy"] == tiny_policy_path and second["reference"] == tiny_policy_path
    assert json.loads((r0 / "state.json").read_text())["done"] == ["search", "pairs", "train"]
    assert (out / "config.json").exists() and json.loads((out / "metrics.json").read_text())["rounds"][0]["train_steps"] == 4
