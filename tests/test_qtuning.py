"""Q-Tuning: the selection rules on hand-made and random scores, the mask reaching the loss, and a
few real Q-Tuning SFT steps on the tiny policy (full-parameter and LoRA)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from treetune.trainers.qtuning.select import (
    MAX_ALPHA,
    NONE,
    Q1,
    Q2,
    Q3,
    Q4,
    bisect_alpha,
    budget,
    kept_quadrant_count,
    quadrants,
    select_samples,
    smoothed_token_scores,
    supp_scores,
    token_keep_mask,
)

ROOT = Path(__file__).resolve().parents[1]


# ---- sample selection -------------------------------------------------------------------------

@pytest.mark.parametrize("size", [8, 16, 32, 64])
@pytest.mark.parametrize("ratio", [0.125, 0.25, 0.5])
def test_bisection_meets_the_budget_on_random_scores(size, ratio):
    rng = np.random.default_rng(size * 1000 + int(ratio * 1000))
    iterations = 10
    for trial in range(40):
        ppl = np.exp(rng.normal(1.0, 0.5, size))
        # Half the trials correlate entropy with perplexity, as real scores do (often forcing the fallback).
        ent = rng.normal(0, 1, size) + (2.0 * np.log(ppl) if trial % 2 else 0.0)
        target = budget(size, ratio)
        alpha, met = bisect_alpha(ppl, ent, target, iterations)
        if met:
            assert kept_quadrant_count(ppl, ent, alpha) >= target
            # the smallest such share up to the bisection's resolution
            assert kept_quadrant_count(ppl, ent, alpha - MAX_ALPHA / 2 ** iterations) < target
        else:
            assert alpha == MAX_ALPHA and kept_quadrant_count(ppl, ent, MAX_ALPHA) < target
        selection = select_samples(ppl, ent, ratio, iterations)
        assert len(selection.kept) == target == max(1, int(ratio * size))
        assert len(set(selection.kept.tolist())) == target
        core = np.flatnonzero(np.isin(selection.quadrant, (Q2, Q4)))
        supp = supp_scores(ppl, ent)
        if len(core) >= target:  # all from Q2 + Q4, the farthest off the diagonal
            assert set(selection.kept) <= set(core) and selection.topped_up == 0
            left_out = sorted(set(core) - set(selection.kept))
            assert all(supp[k] >= supp[j] for k in selection.kept for j in left_out)
            assert selection.trimmed == len(core) - target
        else:  # every Q2 + Q4 sample, then the top-up
            assert set(core) <= set(selection.kept) and selection.topped_up == target - len(core)
        # token pruning goes to the high-error side: every Q2 sample, never a Q4 one
        for index, prune in zip(selection.kept, selection.prune_tokens):
            if selection.quadrant[index] == Q2:
                assert prune
            if selection.quadrant[index] == Q4:
                assert not prune


def test_quadrants_on_a_hand_made_batch():
    ppl = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=float)
    ent = np.array([8, 1, 4.5, 4.6, 4.4, 4.7, 7, 2])
    # alpha 0.25: PPL bands 2.75 / 6.25, entropy bands 3.8 / 5.275 (linear quantiles)
    assert quadrants(ppl, ent, 0.25).tolist() == [Q4, Q3, NONE, NONE, NONE, NONE, Q1, Q2]
    selection = select_samples(ppl, ent, 0.25)
    assert selection.kept.tolist() == [0, 7] and selection.topped_up == 0
    assert selection.prune_tokens.tolist() == [False, True]  # the calibration sample keeps all its tokens
    # the misconception sample needs entropy below the alpha-quantile: alpha just above 1/7
    assert 1 / 7 < selection.alpha <= 1 / 7 + MAX_ALPHA / 2 ** 10
    assert selection.counts == {"q1_harmful_noise": 1, "q2_misconception": 1, "q3_redundant": 1,
                                "q4_calibration": 1, "unassigned": 4}
    # a budget of one: the calibration sample (low PPL, highest entropy) qualifies at the smallest alpha
    assert select_samples(ppl, ent, 0.125).kept.tolist() == [0]


def test_fallback_tops_up_from_q1_and_q3_by_distance_from_the_diagonal():
    # Entropy rises with perplexity: no sample is ever a misconception or calibration one.
    ppl = np.arange(1, 9, dtype=float)
    ent = np.array([1.0, 2.9, 3.0, 4.0, 5.0, 6.0, 6.1, 8.0])
    assert kept_quadrant_count(ppl, ent, MAX_ALPHA) == 0
    assert bisect_alpha(ppl, ent, 2) == (MAX_ALPHA, False)
    selection = select_samples(ppl, ent, 0.25)
    # samples 1 and 6 sit farthest off the diagonal (|PPL^ - Ent^| = 0.129; all others 0)
    assert selection.kept.tolist() == [1, 6] and selection.topped_up == 2
    assert selection.quadrant[[1, 6]].tolist() == [Q3, Q1]
    assert selection.prune_tokens.tolist() == [False, True]  # a Q1 top-up is token-pruned like Q2
    assert selection.counts["q1_harmful_noise"] == 4 and selection.counts["q3_redundant"] == 4


def test_budget_and_bad_input():
    assert budget(8, 0.125) == 1 and budget(8, 0.25) == 2 and budget(3, 0.125) == 1 and budget(0, 0.5) == 0
    assert budget(10, 0.5) == 5 and budget(7, 1.0) == 7
    with pytest.raises(ValueError):
        budget(8, 0.0)
    with pytest.raises(ValueError):
        select_samples([1.0, float("nan")], [1.0, 2.0], 0.5)


# ---- token scoring ----------------------------------------------------------------------------

def test_smoothed_token_scores_at_sequence_edges():
    p = np.array([2.0, 3.0, 5.0, 7.0])
    lam = 0.5
    expected = [(1 - lam) * 2 + lam * (2 + 3), (1 - lam) * 3 + lam * (2 + 5),
                (1 - lam) * 5 + lam * (3 + 7), (1 - lam) * 7 + lam * (5 + 7)]
    assert smoothed_token_scores(p, lam).tolist() == pytest.approx(expected)
    assert smoothed_token_scores(np.array([4.0]), lam).tolist() == pytest.approx([(1 - lam) * 4 + lam * 8])
    assert smoothed_token_scores(np.array([]), lam).tolist() == []
    assert smoothed_token_scores(p, 0.0).tolist() == pytest.approx(p.tolist())


def test_token_keep_mask_drops_high_local_perplexity_at_either_edge():
    flat = [0.01] * 6
    first = np.array([5.0] + flat[1:])  # a surprising first answer token
    assert token_keep_mask(first, 0.5).tolist() == [False, False, True, True, True, False]
    # ... the kept three are the lowest scores: the spike and its neighbour go, and of the tied
    # rest the earlier tokens stay (stable order)
    last = np.array(flat[:-1] + [5.0])
    assert token_keep_mask(last, 0.5).tolist() == [True, True, True, False, False, False]
    assert token_keep_mask(np.array([3.0]), 0.5).tolist() == [True]  # at least one token stays
    assert token_keep_mask(np.array([]), 0.5).tolist() == []
    assert token_keep_mask(np.array([800.0, 0.1, 0.2]), 0.5).tolist() == [False, False, True]  # no overflow
    assert token_keep_mask(np.arange(10.0), 0.7).sum() == 7


# ---- the trainer ------------------------------------------------------------------------------

def _records(n: int) -> list[dict]:
    from treetune.data import PromptTemplate, load_problems

    template = PromptTemplate(style="bare")
    return [{"prompt": template.render(p.question), "completion": p.solution}
            for p in load_problems("arith", "train", limit=n, seed=7)]


def test_pruned_tokens_get_no_gradient(tmp_path, tiny_policy_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treetune.trainers.qtuning.config import QTuningConfig
    from treetune.trainers.qtuning.trainer import QTuningTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_path)
    config = QTuningConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, sample_ratio=0.5, token_ratio=0.5,
                           max_length=128, report_to=[], bf16=False, use_cpu=True, seed=0, disable_tqdm=True)
    trainer = QTuningTrainer(model=model, args=config, train_dataset=Dataset.from_list(_records(8)), processing_class=tokenizer)
    trainer.model_wrapped = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    full_labels = batch["labels"].clone()
    pruned = trainer._qtune(dict(batch))
    assert pruned["labels"].shape[0] == 4  # 50% of the samples
    totals = trainer.qtuning_totals
    assert totals["samples"] == 8 and totals["kept_samples"] == 4
    assert 0 < totals["loss_tokens"] < totals["answer_tokens"]
    assert totals["backward_tokens"] < totals["scoring_tokens"]

    # Every kept row is a batch row, its prompt and padding untouched, its answer tokens a subset
    # of the original ones; a token-pruned row keeps exactly floor(50%) of its answer tokens.
    rows = [next(i for i in range(8) if torch.equal(batch["input_ids"][i, :pruned["input_ids"].shape[1]], pruned["input_ids"][r]))
            for r in range(4)]
    pruned_rows = 0
    for r, i in enumerate(rows):
        width = pruned["labels"].shape[1]
        original, now = full_labels[i, :width], pruned["labels"][r]
        assert bool(((now == -100) | (now == original)).all())
        answer, kept = int((original != -100).sum()), int((now != -100).sum())
        assert kept == answer or kept == budget(answer, 0.5)
        pruned_rows += kept < answer
    assert pruned_rows >= 1

    # Gradient through the trainer's own loss: the final hidden state at position j feeds only the
    # prediction of token j + 1, so its gradient is zero exactly where that token is out of the loss.
    captured = {}
    base = trainer.model.model
    handle = base.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, pruned)
    handle.remove()
    hidden = captured["h"]
    (grad,) = torch.autograd.grad(loss, hidden)
    per_position = grad[:, :-1].abs().sum(-1)
    in_loss = pruned["labels"][:, 1:] != -100
    assert bool((per_position[~in_loss] == 0).all())
    assert bool((per_position[in_loss] > 0).all())
    # and the loss is the mean NLL over exactly the kept tokens
    with torch.no_grad():
        logits = trainer.model(input_ids=pruned["input_ids"], attention_mask=pruned["attention_mask"]).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                pruned["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert float(loss.detach()) == pytest.approx(float(nll), rel=1e-4)


def _launch(out: Path, *flags: str) -> dict:
    command = [sys.executable, str(ROOT / "launch" / "qtuning_sft.py"), "--config", str(ROOT / "configs" / "qtuning_sft" / "arith.yaml"),
               "--limit", "48", "--max_steps", "3", "--gradient_accumulation_steps", "2",
               "--logging_steps", "1", "--disable_tqdm", "true", "--output_dir", str(out), *flags]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def _changed(out: Path, policy: str) -> bool:
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(policy)
    return any((a - b).abs().max() > 0 for a, b in zip(after.parameters(), before.parameters()))


@pytest.mark.slow
def test_qtuning_sft_end_to_end_on_the_tiny_policy(tmp_path, tiny_policy_path):
    metrics = _launch(tmp_path / "qt", "--sample_ratio", "0.125", "--token_ratio", "0.5")
    assert metrics["steps"] == 3
    totals = metrics["totals"]
    assert totals["samples"] == 3 * 2 * 8 and totals["kept_samples"] == 3 * 2  # one sample per micro-batch of 8
    assert 0 < metrics["kept_token_share"] < 1
    assert totals["backward_tokens"] < totals["scoring_tokens"] / 4
    steps = [h for h in metrics["log_history"] if "loss" in h]
    assert len(steps) == 3
    for h in steps:
        quadrant_counts = sum(h[f"qtuning/{k}"] for k in ("q1_harmful_noise", "q2_misconception", "q3_redundant",
                                                          "q4_calibration", "unassigned"))
        assert quadrant_counts == 16 and h["qtuning/kept_sample_share"] == 0.125
        assert 0 < h["qtuning/kept_token_share"] < 1
    assert _changed(tmp_path / "qt", tiny_policy_path)


@pytest.mark.slow
def test_lora_qtuning_saves_a_merged_model(tmp_path, tiny_policy_path):
    metrics = _launch(tmp_path / "lora", "--use_peft", "true", "--lora_r", "4", "--learning_rate", "0.01")
    assert metrics["totals"]["kept_samples"] == 3 * 2 * 2  # 25% of 8, per micro-batch
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    assert _changed(tmp_path / "lora", tiny_policy_path)


@pytest.mark.slow
def test_full_budget_is_plain_sft_without_scoring(tmp_path):
    metrics = _launch(tmp_path / "full", "--sample_ratio", "1", "--token_ratio", "1", "--max_steps", "1")
    totals = metrics["totals"]
    assert totals["kept_samples"] == totals["samples"] == 16 and totals["scoring_tokens"] == 0
    assert totals["loss_tokens"] == totals["answer_tokens"] and metrics["kept_token_share"] == 1


def test_random_baseline_prunes_to_the_same_budgets():
    from treetune.trainers.qtuning.trainer import random_prune_batch

    labels = torch.full((8, 12), -100)
    labels[:, 4:10] = 7  # six answer tokens a row
    labels[5, 4:] = -100  # one row with no answer: never chosen
    inputs = {"input_ids": torch.ones(8, 12, dtype=torch.long), "attention_mask": torch.ones(8, 12, dtype=torch.long),
              "labels": labels}
    seen = set()
    for seed in range(60):
        # the budget counts rows with an answer, as Q-Tuning's selection does: 50% of 7 -> 3
        pruned, stats, kept = random_prune_batch(inputs, 0.5, 0.5, np.random.default_rng(seed))
        assert len(kept) == 3 and 5 not in kept and pruned["labels"].shape == (3, 12)
        assert ((pruned["labels"] != -100).sum(1) == 3).all()
        assert stats["answer_tokens"] == 42 and stats["loss_tokens"] == 9 and stats["backward_tokens"] == 36
        seen.update(kept.tolist())
    assert len(seen) == 7  # every row with an answer gets its turn


@pytest.mark.slow
def test_resume_continues_the_totals_and_the_random_draws(tmp_path):
    """A run stopped at a checkpoint and resumed ends with the same totals as one that ran through
    (the random baseline's draws depend only on its generator and the data order)."""
    flags = ("--pruning", "random", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    whole = _launch(tmp_path / "whole", *flags)
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", stopped / "checkpoint-2")
    resumed = _launch(stopped, *flags, "--resume_from_checkpoint", str(stopped / "checkpoint-2"))
    assert resumed["steps"] == whole["steps"] == 4
    assert resumed["totals"] == whole["totals"]
    assert 0 < whole["totals"]["loss_tokens"] < whole["totals"]["answer_tokens"]


@pytest.mark.slow
def test_qtuning_under_deepspeed_zero3_with_two_processes(tmp_path, tiny_policy_path):
    """The real DeepSpeed engine (CPU accelerator, gloo): each rank prunes its own micro-batches, the
    logged totals are summed over ranks, every rank checkpoints its Q-Tuning state, and the saved
    model is whole (16-bit gathered) and trained."""
    import os

    from treetune.trainers.distributed import launch_command

    out = tmp_path / "zero3"
    command = launch_command(ROOT / "configs" / "accelerate" / "zero3.yaml", [str(ROOT / "launch" / "qtuning_sft.py")],
                             num_processes=2)
    command += ["--config", str(ROOT / "configs" / "qtuning_sft" / "arith.yaml"), "--limit", "64",
                "--max_steps", "2", "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true",
                "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out)]
    env = dict(os.environ, TREETUNE_LOG="WARNING", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    totals = metrics["totals"]
    assert totals["samples"] == 2 * 2 * 8 * 2 and totals["kept_samples"] == totals["samples"] // 4
    assert 0 < totals["loss_tokens"] < totals["answer_tokens"]
    states = [json.loads((out / "checkpoint-2" / f"qtuning_state_{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0]["totals"] == states[1]["totals"] == totals
    assert (out / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own checkpoint format
    assert _changed(out, tiny_policy_path)
