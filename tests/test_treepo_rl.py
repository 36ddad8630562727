"""Online RL (`launch/treepo.py`, `treetune.trainers.treepo`): trees as GRPO rows, tree advantages in
TRL's loss, the engine synced to the trainer every step, resume, distributed runs, the real model."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "treepo" / "arith.yaml"

# a short arith run: 8 trees of G = 8 leaves a step, one generation per optimizer step
# the 2-process runs roll out on HF engines: vLLM on two ranks of two cores costs minutes, and its
# in-place sync is proven by the single-process tests
ENGINE = "hf"

SMALL = ["--limit", "256", "--per_device_train_batch_size", "32", "--gradient_accumulation_steps", "2",
         "--max_completion_length", "96", "--eval_problems", "0", "--disable_tqdm", "true", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def engine(tiny_policy_path):
    """An engine of this module's own: every run here leaves its trained weights in it."""
    from treetune.rollouts.engines import VLLMEngine

    with VLLMEngine(tiny_policy_path, kv_cache_gb=0.25) as engine:
        yield engine


def parse(argv):
    from treetune.trainers.common import parse_recipe
    from treetune.trainers.treepo.config import TreePOConfig, TreePOScriptArguments
    from trl import ModelConfig

    return parse_recipe((TreePOScriptArguments, TreePOConfig, ModelConfig), argv)


def run(tmp_path, engine, *extra, name="run"):
    from treetune.trainers.treepo.loop import run_treepo

    args, config, model_args = parse(["--config", str(RECIPE), "--output_dir", str(tmp_path / name), *SMALL, *extra])
    return run_treepo(args, config, model_args, engine=engine), tmp_path / name


def test_trl_hooks_this_trainer_relies_on_exist():
    """The private GRPOTrainer hooks the trainer overrides, with the signatures it calls (TRL is pinned)."""
    from trl import GRPOTrainer

    assert "rollout_func" in inspect.signature(GRPOTrainer.__init__).parameters
    assert list(inspect.signature(GRPOTrainer._calculate_rewards).parameters) == [
        "self", "inputs", "prompts", "completions", "completion_ids_list"]
    assert list(inspect.signature(GRPOTrainer._generate_and_score_completions).parameters) == ["self", "inputs"]


def test_recipe_checks_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="field 'advantage'"):
        parse(["--config", str(RECIPE), "--output_dir", str(tmp_path), "--advantage", "ppo"])
    with pytest.raises(ValueError, match="field 'whiten'"):
        parse(["--config", str(RECIPE), "--output_dir", str(tmp_path), "--whiten", "batch"])


def test_a_split_group_is_refused():
    from treetune.data.problem import Problem
    from treetune.trainers.treepo.rollout import PromptBook, grow_groups

    book = PromptBook()
    book.add("a", Problem(id="1", question="a", answer="1", source="arith"), [1])
    book.add("b", Problem(id="2", question="b", answer="2", source="arith"), [2])
    with pytest.raises(ValueError, match="not one prompt repeated 2 times"):
        grow_groups(["a", "b", "b", "b"], 2, book, engine=None, sampler=None)


def sampled_reward(engine, problems, samples: int = 32) -> float:
    """Mean outcome reward of `samples` seeded samples per problem at temperature 1: the expected
    reward the policy is trained to raise, with little noise."""
    from treetune.data import PromptTemplate
    from treetune.rewards.grading import grade_many
    from treetune.rollouts.engines import GenerationRequest, SamplingSettings

    template = PromptTemplate(style="bare")
    requests = [GenerationRequest(template.render_ids(p.question, engine.tokenizer),
                                  SamplingSettings(n=samples, temperature=1.0, max_tokens=96, seed=100 + i))
                for i, p in enumerate(problems)]
    texts, golds = [], []
    for problem, result in zip(problems, engine.generate(requests)):
        texts += [c.text for c in result.completions]
        golds += [problem.answer] * len(result.completions)
    return sum(grade_many(texts, golds)) / len(texts)


@pytest.mark.slow
def test_treepo_run_learns_and_serves_the_trained_weights(tmp_path, engine):
    """A short TreePO run on 16 arith problems: exactly G rows a tree, the policy's expected reward on
    them up, the engine serving the final policy (its sampled log-probs equal the saved model's),
    files a user reads."""
    import torch
    from transformers import AutoModelForCausalLM

    from treetune.data import load_problems
    from treetune.rollouts.engines import GenerationRequest, SamplingSettings

    problems = load_problems("arith", "train", limit=16)
    engine.update_weights(folder=engine.model)  # the start policy (an earlier test may have trained it)
    start = sampled_reward(engine, problems)
    metrics, out = run(tmp_path, engine, "--max_steps", "12", "--limit", "16", "--eval_problems", "40")
    history = [h for h in metrics["history"] if "reward" in h]
    assert len(history) == 12 and metrics["trajectories"] == 12 * 8 * 8 and metrics["trees"] == 12 * 8
    end = sampled_reward(engine, problems)  # the engine took the final weights
    assert end > start + 0.03, (start, end)
    assert metrics["decoded_share_of_rows"] < 0.9  # shared prefixes decoded once
    assert 0 < metrics["sync_seconds"] and metrics["syncs"] >= 12
    assert metrics["greedy_before"]["problems"] == 40 and metrics["greedy_after"]["problems"] == 40
    assert all(0 < h["rollout/prefix_cache_hit_rate"] <= 1 for h in history)
    assert all(h["time/training_seconds"] > 0 for h in history)
    assert (out / "training.png").stat().st_size > 0 and (out / "eval_after_metrics.json").exists()

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    prompt = engine.tokenizer("Sam has 4 red pens and buys 3 more.")["input_ids"]
    result = engine.generate([GenerationRequest(prompt, SamplingSettings(n=4, temperature=1.0, seed=3, max_tokens=24))])
    for completion in result[0].completions:
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion.token_ids).unsqueeze(1)).squeeze(1)
        assert torch.allclose(expected, torch.tensor(completion.logprobs), atol=1e-3)


@pytest.mark.slow
def test_segment_advantages_and_masked_trees(tmp_path, engine):
    metrics, _ = run(tmp_path, engine, "--max_steps", "2", "--advantage", "segment", "--mask_zero_variance_trees", "true",
                     "--fork", "coupled", "--segment_tokens", "32")
    assert metrics["steps"] == 2 and metrics["advantage"] == "segment" and metrics["fork"] == "coupled"
    assert metrics["trees"] == 16 and 0 < metrics["masked_trees"] < 16  # some trees all right or all wrong


@pytest.mark.slow
def test_grpo_flat_run(tmp_path, engine):
    metrics, _ = run(tmp_path, engine, "--max_steps", "2", "--sampler", "flat", "--advantage", "grpo")
    assert metrics["decoded_share_of_rows"] == pytest.approx(1.0)  # flat: every row decoded on its own
    assert metrics["steps"] == 2


@pytest.mark.slow
def test_resume_regrows_the_same_trees(tmp_path, engine):
    """Killed after step 2 and resumed: steps 3 and 4 see the same trees (rewards, tokens) as an unbroken run."""
    whole, out = run(tmp_path, engine, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
                     "--learning_rate", "1e-4", name="whole")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copytree(out / "checkpoint-2", broken / "checkpoint-2")
    resumed, _ = run(tmp_path, engine, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
                     "--learning_rate", "1e-4", "--resume_from_checkpoint", "auto", name="broken")
    assert resumed["resumed_step"] == 2

    def later(metrics):
        return [value for h in metrics["history"] if "reward" in h and h["step"] > 2
                for value in (h["step"], h["reward"], h["rollout/decoded_tokens"])]

    assert later(resumed)[::3] == [3, 4]
    assert later(resumed) == pytest.approx(later(whole))


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config", ["ddp", "zero3"])
def test_two_processes(tmp_path, accelerate_config):
    """`accelerate launch --num_processes 2 launch/treepo.py` under DDP and ZeRO-3 (gloo): every rank
    grows whole trees on its own engine and takes the gathered weights every step."""
    from treetune.trainers.distributed import launch_command

    out = tmp_path / accelerate_config
    command = launch_command(ROOT / "configs" / "accelerate" / f"{accelerate_config}.yaml", [
        str(ROOT / "launch" / "treepo.py"), "--config", str(RECIPE), "--output_dir", str(out), *SMALL,
        "--per_device_train_batch_size", "16", "--max_steps", "2", "--engine", ENGINE], num_processes=2)
    env = dict(os.environ, TREETUNE_LOG="WARNING", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    assert metrics["trees"] == 2 * 2 * 4  # 2 steps x 2 ranks x 4 trees (16 rows x 2 micro-batches / G)
    assert metrics["syncs"] >= 3  # start, after step 1, final


@pytest.mark.slow
def test_a_few_steps_on_the_real_model(tmp_path, smollm2_path, smollm2_engine):
    """SmolLM2 in its chat template: trees from the session's engine, two optimizer steps, weights synced."""
    from treetune.trainers.treepo.loop import run_treepo

    args, config, model_args = parse([
        "--config", str(RECIPE), "--model_name_or_path", smollm2_path, "--source", "gsm8k",
        "--data_path", str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"), "--limit", "4",
        "--num_generations", "4", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_completion_length", "32", "--segment_tokens", "8", "--max_steps", "2", "--eval_problems", "0",
        "--output_dir", str(tmp_path / "smol"), "--disable_tqdm", "true"])
    try:
        metrics = run_treepo(args, config, model_args, engine=smollm2_engine)
    finally:  # the session's engine serves SmolLM2 as shipped to the tests after this one
        smollm2_engine.update_weights(folder=smollm2_path)
    assert metrics["prompt_style"] == "chat" and metrics["steps"] == 2 and metrics["trees"] == 4
    assert metrics["syncs"] >= 3
