"""Step-DPO: step-pair tokenisation (labels on step tokens only, no EOS), the public record format,
pair extraction from trees, the resumable pair pipeline's bookkeeping, and a short real training
run whose loss falls and which resumes from a checkpoint."""

from __future__ import annotations

import json
import math
import random

import pytest
from treetune.data import DataError
from treetune.data.arith import arith_problems
from treetune.data.step_pairs import StepPair, dpo_prompt, load_step_pairs, write_step_pairs
from treetune.rollouts.tree import ReasoningTree
from treetune.trainers.step_dpo.pairs import PairProgress, first_wrong_step, raw_steps, tree_branch_pairs
from treetune.trainers.step_dpo.trainer import tokenize_step_pair

PUBLIC_ROW = {
    "dataset": "MATH_Rephrased",
    "prompt": "What is $2+3\\cdot 4$?",
    "initial_reason_steps": "Let's think step by step.\nStep 1: Multiply first: $3\\cdot 4=12$.\nStep 2:",
    "chosen": " Add: $2+12=14$.",
    "rejected": " Add: $2+12=15$.",
    "full_chosen": " Add: $2+12=14$.\nStep 3: The answer is $\\boxed{14}$.",
    "full_rejected": " Add: $2+12=15$.\nStep 3: The answer is $\\boxed{15}$.",
    "answer": "14",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_policy_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy_path)


def test_step_tokens_carry_the_loss_and_no_eos_is_added(tokenizer):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    prompt, chosen, rejected = "Mia has 7 pens. She gets 5 more.\n7+5=12\n", "12-3=9\n", "12-3=8\nThe answer"
    row = tokenize_step_pair(prompt, chosen, rejected, tokenizer, max_length=None, max_prompt_length=None)
    assert row["chosen_ids"] == tokenizer(chosen, add_special_tokens=False)["input_ids"]
    assert row["rejected_ids"] == tokenizer(rejected, add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id not in row["chosen_ids"] + row["rejected_ids"]
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)([row])
    chosen_row, rejected_row = batch["input_ids"][0], batch["input_ids"][1]
    mask_c, mask_r = batch["completion_mask"][0].bool(), batch["completion_mask"][1].bool()
    assert tokenizer.decode(chosen_row[mask_c]) == chosen
    assert tokenizer.decode(rejected_row[mask_r]) == rejected
    assert tokenizer.decode(chosen_row[~mask_c & batch["attention_mask"][0].bool()]) == prompt


def test_a_long_pair_loses_the_start_of_its_prompt_never_the_step(tokenizer):
    prompt = "Tom has 3 cards. " * 20 + "\n"
    row = tokenize_step_pair(prompt, "3+4=7\n", "3+4=8\n", tokenizer, max_length=40, max_prompt_length=None)
    assert row["prompt_truncated"] and row["length"] == 40
    assert tokenizer.decode(row["chosen_ids"]) == "3+4=7\n"
    full = tokenizer(prompt)["input_ids"]
    assert row["prompt_ids"] == full[-len(row["prompt_ids"]):]
    assert tokenize_step_pair(prompt, "3+4=7\n" * 30, "x", tokenizer, max_length=40, max_prompt_length=None) is None


def test_public_step_dpo_records_load_and_render_as_released(tmp_path):
    path = tmp_path / "public.jsonl"
    path.write_text(json.dumps(PUBLIC_ROW) + "\n")
    (pair,), report = load_step_pairs(str(path))
    assert len(report) == 0
    assert pair.chosen == " Add: $2+12=14$." and pair.answer == "14"
    assert pair.extra["full_chosen"].startswith(" Add")
    assert dpo_prompt(pair, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is $2+3\\cdot 4$?\n\n### Response:\n" + PUBLIC_ROW["initial_reason_steps"])
    qwen = dpo_prompt(pair, "qwen2-boxed")
    assert qwen.endswith("<|im_start|>assistant\n" + PUBLIC_ROW["initial_reason_steps"])
    assert "put your final answer within \\boxed{}." in qwen
    assert dpo_prompt(pair, "bare") == "What is $2+3\\cdot 4$?\n" + PUBLIC_ROW["initial_reason_steps"]


def test_bad_pair_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [PUBLIC_ROW, {**PUBLIC_ROW, "rejected": PUBLIC_ROW["chosen"]}, {k: v for k, v in PUBLIC_ROW.items() if k != "chosen"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_step_pairs(str(path))
    assert f"{path}:2" in str(err.value) and "rejected" in str(err.value)
    pairs, report = load_step_pairs(str(path), skip_bad=True)
    assert len(pairs) == 1 and len(report) == 2
    assert "field 'chosen': missing" in report.summary()


def test_raw_steps_keep_delimiters_and_first_wrong_step():
    text = "7+5=12\n12-3=9\n\nThe answer is \\boxed{9}"
    steps = raw_steps(text, "\n")
    assert "".join(steps) == text
    assert steps == ["7+5=12\n", "12-3=9\n\n", "The answer is \\boxed{9}"]
    assert first_wrong_step([0.9, 0.7, 0.2, 0.1], 0.5) == 2
    assert first_wrong_step([0.9, 0.7], 0.5) == -1


def test_branch_pairs_from_a_hand_built_tree():
    tree = ReasoningTree(problem_id="p", prompt="Q\n", prompt_ids=[1], answer="9", problem={"question": "Q"})
    a = tree.add(0, "7+5=12\n", [1])
    good = tree.add(a.id, "12-3=9\n", [1])
    bad = tree.add(a.id, "12-3=8\n", [1])
    for parent, text, outcome in ((good.id, "The answer is \\boxed{9}", 1.0), (good.id, "The answer is \\boxed{8}", 0.0),
                                  (bad.id, "The answer is \\boxed{8}", 0.0)):
        leaf = tree.add(parent, text, [1], finish_reason="stop")
        leaf.scores["outcome"] = outcome
    pairs = tree_branch_pairs(tree, margin=0.5)
    # node `a` branches: 12-3=9 (value 1/2) against 12-3=8 (value 0): a gap of 0.5
    assert [(p.initial_reason_steps, p.chosen, p.rejected, p.chosen_value, p.rejected_value) for p in pairs] == [
        ("7+5=12\n", "12-3=9\n", "12-3=8\n", 0.5, 0.0),
        ("7+5=12\n12-3=9\n", "The answer is \\boxed{9}", "The answer is \\boxed{8}", 1.0, 0.0)]
    assert tree_branch_pairs(tree, margin=0.6)[0].step_index == 2  # only the leaf-level pair is that far apart
    # MCTS trees carry their own values: a node's `q` wins over the subtree share
    good.scores["q"], bad.scores["q"] = 0.2, 0.1
    (only,) = tree_branch_pairs(tree, value_key="q", margin=0.5)  # the leaves have no q: their outcomes count
    assert only.chosen == "The answer is \\boxed{9}"
    # a path that stopped right at a branch adds an empty child: it is never a step of a pair
    empty = tree.add(a.id, "", [], finish_reason="stop")
    empty.scores["outcome"] = 0.0
    assert all(p.chosen.strip() and p.rejected.strip() for p in tree_branch_pairs(tree, margin=0.0))


def test_pair_progress_drops_pairs_of_unfinished_problems(tmp_path):
    pair = StepPair(prompt="Q", initial_reason_steps="", chosen="a", rejected="b", problem_id="p1")
    progress = PairProgress(tmp_path)
    progress.record(["p1", "p2"], [pair, pair], {"p2": "no wrong sample"})
    # a killed run: pairs of p3 written, its status line never was
    with (tmp_path / "pairs.jsonl").open("a") as handle:
        handle.write(StepPair(prompt="Q", initial_reason_steps="", chosen="c", rejected="d", problem_id="p3").to_json() + "\n")
    reopened = PairProgress(tmp_path)
    assert set(reopened.done) == {"p1", "p2"}
    assert reopened.done["p2"]["status"] == "no wrong sample" and reopened.done["p1"]["pairs"] == 2
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(l)["problem_id"] == "p1" for l in lines)


def arith_step_pairs(count: int) -> list[StepPair]:
    """Gold step against the same step with its result off by one: pairs with a known answer."""
    rng = random.Random(0)
    pairs = []
    for problem in arith_problems("train", limit=count):
        steps = raw_steps(problem.solution, "\n")
        k = rng.randrange(len(steps) - 1)
        lhs, result = steps[k].rstrip("\n").split("=")
        wrong = f"{lhs}={int(result) + rng.choice((-1, 1))}\n"
        pairs.append(StepPair(prompt=problem.question, initial_reason_steps="".join(steps[:k]), chosen=steps[k],
                              rejected=wrong, answer=problem.answer, problem_id=problem.id, step_index=k))
    return pairs


@pytest.mark.slow
def test_training_loss_falls_and_a_run_resumes_from_its_checkpoint(tmp_path, tiny_policy_path):
    from treetune.trainers.step_dpo.trainer import main

    pairs_path = tmp_path / "pairs.jsonl"
    write_step_pairs(arith_step_pairs(64), pairs_path)
    out = tmp_path / "run"
    common = ["--pairs", str(pairs_path), "--output_dir", str(out), "--beta", "0.5", "--learning_rate", "1e-4",
              "--per_device_train_batch_size", "8", "--max_length", "128", "--logging_steps", "1", "--report_to", "none",
              "--save_strategy", "steps", "--save_steps", "4", "--lr_scheduler_type", "constant", "--seed", "0",
              "--disable_tqdm", "true"]
    main(common + ["--max_steps", "4"])
    assert (out / "checkpoint-4").is_dir()
    main(common + ["--max_steps", "8", "--resume_from_checkpoint", "auto"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["pairs"] == 64 and metrics["prompt_style"] == "bare"
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, 9))  # steps 1-4 kept, 5-8 new
    assert losses[0] == pytest.approx(0.6931, abs=0.01)  # policy == reference at the start
    assert 0.0 <= metrics["padding_share"] < 1.0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the DPO loss over all training pairs (not one noisy batch) fell from log 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_path)
    pairs = load_step_pairs(str(pairs_path))[0]
    before = margins(AutoModelForCausalLM.from_pretrained(tiny_policy_path), tokenizer, pairs)
    after = margins(AutoModelForCausalLM.from_pretrained(out), tokenizer, pairs)  # a plain checkpoint
    full_loss = sum(math.log1p(math.exp(-0.5 * (a - b))) for a, b in zip(after, before)) / len(pairs)
    assert full_loss < math.log(2) - 0.05


def margins(model, tokenizer, pairs) -> list[float]:
    """log p(chosen step) - log p(rejected step) given the DPO prompt, per pair."""
    import torch

    def logp(prompt: str, step: str) -> float:
        p_ids = tokenizer(prompt)["input_ids"]
        s_ids = tokenizer(step, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p_ids + s_ids])).logits[0, len(p_ids) - 1:-1]
        return float(torch.log_softmax(logits, -1)[torch.arange(len(s_ids)), torch.tensor(s_ids)].sum())

    return [logp(dpo_prompt(p, "bare"), p.chosen) - logp(dpo_prompt(p, "bare"), p.rejected) for p in pairs]
