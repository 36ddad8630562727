"""MCTS-DPO (one round), BVPO (data and training, both think modes) and Q-Tuning on the real-model
ground, each run as a user runs it (`main([...])` with a recipe and overrides):

- MCTS-DPO on SmolLM2-135M-Instruct (Llama architecture, 49,152-token BPE, ChatML) over a GSM8K
  training problem, steps cut at blank lines, inner steps valued by GroundedPRM's equation tool;
- BVPO with a random-weight Qwen3 model carrying Qwen's real tokenizer and chat template, whose
  `enable_thinking=False` rendering is the empty-trace prompt, pairs ranked by a random reward model;
- Q-Tuning SFT on SmolLM2 with GSM8K rows in the chat template, the recipe's LoRA merged at the end.

Each checks what a user would look at: the chat template in the ids the engine and the trainer
got, the think block in the right mode, step boundaries and pairs under real BPE, Q-Tuning's token
masks on real tokens, `metrics.json`, and the saved model loading with `from_pretrained` and
generating. Sizes are tiny (one or two problems, a few dozen tokens, two optimizer steps) to fit CI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from treetune.data import DEFAULT_INSTRUCTION, DataError, load_problems
from treetune.data.bvpo_pairs import BVPOPair, load_bvpo_pairs, write_bvpo_pairs
from treetune.data.pretrained import qwen_tokenizer, random_qwen
from treetune.data.step_pairs import load_step_pairs
from treetune.launch import bvpo, bvpo_data, mcts_dpo, qtuning_sft
from treetune.rollouts.engines import VLLMEngine
from treetune.rollouts.tree import ReasoningTree
from treetune.rollouts.tree_io import read_trees
from treetune.trainers.bvpo.pairs import pick_pair
from treetune.trainers.bvpo.trainer import BVPOTrainer
from treetune.trainers.common import load_tokenizer
from treetune.trainers.mcts_dpo.loop import MCTSDPOArgs, eval_problems, warn_if_no_preference
from treetune.trainers.mcts_dpo.pairs import mcts_pairs, visit_smoothing
from treetune.trainers.mcts_dpo.trainer import MCTSDPOTrainer
from treetune.trainers.qtuning.select import budget
from treetune.trainers.qtuning.trainer import QTuningTrainer

ROOT = Path(__file__).resolve().parents[1]
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def qwen3_path() -> str:
    return random_qwen("qwen3")


def record_calls(monkeypatch, cls, method: str) -> list[tuple]:
    """Record (args, kwargs, result) of every call of `cls.method`; the real method runs unchanged."""
    calls: list[tuple] = []
    real = getattr(cls, method)

    def recording(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(cls, method, recording)
    return calls


def chat_prompt(tokenizer, question: str, **kwargs) -> str:
    """The prompt treetune's chat style renders: the instruction as system turn, the question as user turn."""
    return tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_INSTRUCTION},
                                          {"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True, **kwargs)


def split_row(inputs: dict, row: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one row of a TRL preference batch."""
    n = int(inputs["attention_mask"][row].sum())
    ids, completion = inputs["input_ids"][row, :n].tolist(), inputs["completion_mask"][row, :n].bool().tolist()
    return [i for i, c in zip(ids, completion) if not c], [i for i, c in zip(ids, completion) if c]


def moved(path: str | Path, start: str) -> bool:
    """Whether any weight of the model at `path` differs from the one at `start`."""
    from safetensors.torch import load_file

    new, old = load_file(str(Path(path) / "model.safetensors")), load_file(str(Path(start) / "model.safetensors"))
    assert set(new) == set(old), "the saved model's weights are not the base architecture's (an adapter left unmerged?)"
    return any(not torch.equal(new[k].float(), old[k].float()) for k in old)


def assert_loads_and_generates(path: Path, prompt: str) -> str:
    """The saved model and tokenizer load with `from_pretrained` and continue a chat prompt."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    return tokenizer.decode(out[0, ids.shape[1]:])


# ---------------------------------------------------------------------------- MCTS-DPO

@pytest.mark.slow
def test_mcts_dpo_one_round_on_smollm2_gsm8k(tmp_path, monkeypatch, smollm2_path, shared_data):
    losses = record_calls(monkeypatch, MCTSDPOTrainer, "compute_loss")
    out = tmp_path / "mcts_dpo"
    data = shared_data / "gsm8k" / "train.jsonl"
    # the arith recipe, pointed at SmolLM2 and GSM8K: one problem, 3 simulations a move, 2 candidate
    # steps each, a step ends at a blank line or after 32 tokens; the inside value is the equation tool;
    # one pair a step, two steps
    metrics = mcts_dpo.main([
        "--config", str(ROOT / "configs/mcts_dpo/arith.yaml"), "--model_name_or_path", smollm2_path,
        "--source", "gsm8k", "--data_path", str(data), "--problems_per_round", "1", "--rounds", "1",
        "--step_mode", "blank_line", "--scorer", "tool", "--step_tokens", "32", "--search_max_tokens", "96",
        "--search_max_depth", "3", "--search_width", "2", "--mcts_iterations", "3", "--correct_only", "false",
        "--eval_limit", "0", "--kv_cache_gb", "0.5", "--per_device_train_batch_size", "1", "--max_steps", "2",
        "--warmup_steps", "0", "--learning_rate", "1e-5", "--logging_steps", "1", "--disable_tqdm", "true",
        "--output_dir", str(out)])
    tok = load_tokenizer(smollm2_path)
    problems = {p.id: p for p in load_problems("gsm8k", "train", path=data, limit=1)}
    r0 = out / "round_0"

    # the trees: SmolLM2's ChatML prompt, every node's text exactly what its tokens decode to, and a
    # node that stopped short of the step budget stopped at the blank line ending its step
    trees = list(read_trees(r0 / "search" / "trees"))
    assert {t.problem_id for t in trees} == set(problems)
    nodes = 0
    for tree in trees:
        assert tree.prompt == chat_prompt(tok, problems[tree.problem_id].question)
        assert tree.prompt_ids == tok(tree.prompt, add_special_tokens=False)["input_ids"]
        assert tree.root.scores["visits"] >= 3
        for node in tree.nodes[1:]:
            nodes += 1
            assert tok.decode(node.token_ids) == node.text
            if not node.finished and len(node.token_ids) < 32:
                # at its first blank line; a token may carry white space on past it ("\n\n   ")
                _, blank, tail = node.text.partition("\n\n")
                assert blank and not tail.strip(), node.text
    assert nodes >= 8

    # the pairs: the tree's own tokens (prompt + selected prefix, then each step), visit smoothing
    pairs, _ = load_step_pairs(str(r0 / "pairs.jsonl"))
    assert len(pairs) >= 2 and len(pairs) == metrics["rounds"][0]["pairs"]
    by_id = {t.problem_id: t for t in trees}
    for pair in pairs:
        tree, extra = by_id[pair.problem_id], pair.extra
        assert extra["prompt_ids"][:len(tree.prompt_ids)] == tree.prompt_ids
        assert tok.decode(extra["prompt_ids"]) == tree.prompt + pair.initial_reason_steps
        assert tok.decode(extra["chosen_ids"]) == pair.chosen and tok.decode(extra["rejected_ids"]) == pair.rejected
        assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
        assert pair.chosen_value > pair.rejected_value
        assert extra["label_smoothing"] == pytest.approx(visit_smoothing(extra["chosen_visits"], extra["rejected_visits"]))

    # what the trainer got: prompt + step ids of the pairs, each pair's own smoothing
    assert len(losses) == 2
    seen = {(tuple(p.extra["prompt_ids"]), tuple(p.extra["chosen_ids"]), tuple(p.extra["rejected_ids"])):
            p.extra["label_smoothing"] for p in pairs}
    trained_eps = []
    for (_, inputs), _, _ in losses:
        half = inputs["input_ids"].shape[0] // 2  # TRL's batch: the chosen rows, then the rejected ones
        for row in range(half):
            (prompt, chosen), (prompt_again, rejected) = split_row(inputs, row), split_row(inputs, row + half)
            assert prompt == prompt_again and tok.decode(prompt).startswith("<|im_start|>system\n" + DEFAULT_INSTRUCTION)
            key = (tuple(prompt), tuple(chosen), tuple(rejected))
            assert key in seen
            assert float(inputs["label_smoothing"][row]) == pytest.approx(seen[key])
            trained_eps.append(seen[key])

    # metrics a user reads, and the checkpoint: it loads, generates, and moved exactly when a pair
    # carried a preference (at smoothing 0.5 the cDPO gradient is zero while policy = reference)
    row = metrics["rounds"][0]
    assert row["stages_done"] == ["search", "pairs", "train"] and row["train_steps"] == 2
    assert math.isfinite(row["train_loss"]) and 0.0 <= row["search_selected_accuracy"] <= 1.0
    assert json.loads((out / "metrics.json").read_text()) == metrics
    train = json.loads((r0 / "model" / "metrics.json").read_text())
    assert train["policy"] == train["reference"] == smollm2_path and train["steps"] == 2
    assert len(train["history"]) == 2 and all(math.isfinite(h["loss"]) for h in train["history"])
    assert any(e < 0.5 for e in trained_eps)
    assert moved(r0 / "model", smollm2_path) == any(e < 0.5 for e in trained_eps)
    assert load_tokenizer(str(r0 / "model")).chat_template == tok.chat_template
    assert_loads_and_generates(r0 / "model", chat_prompt(tok, "What is 2 + 3?"))


def test_mcts_dpo_evaluation_reads_a_local_file(shared_data):
    """Break: the greedy evaluation after each round loaded its source from the hub only, so a run on
    GSM8K files (no network) could not evaluate; `--eval_data_path` names the file."""
    path = shared_data / "gsm8k" / "test.jsonl"
    args = MCTSDPOArgs(eval_source="gsm8k", eval_split="test", eval_data_path=str(path), eval_limit=3)
    problems = eval_problems(args)
    assert [p.question for p in problems] == [p.question for p in load_problems("gsm8k", "test", path=path, limit=3)]
    assert len(problems) == 3 and all(p.answer for p in problems)


# ---------------------------------------------------------------------------- BVPO

def random_reward_model(path: Path) -> str:
    """A random-weight Qwen3 sequence classifier with Qwen's tokenizer: a reward model that ranks
    the random policy's responses (the gold answer cannot: a random model never finds it)."""
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    model = Qwen3ForSequenceClassification(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_bvpo_data_and_training_in_both_think_modes_on_qwen3(tmp_path, monkeypatch, qwen3_path, shared_data):
    tok = load_tokenizer(qwen3_path)
    think, end_think = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    (blank,) = tok("\n\n", add_special_tokens=False)["input_ids"]
    data = shared_data / "gsm8k" / "train.jsonl"
    problems = {p.id: p for p in load_problems("gsm8k", "train", path=data, limit=2)}

    def expected(question: str, mode: str) -> str:
        """Qwen's own rendering: thinking on (the model opens <think> itself), or its enable_thinking=False prompt."""
        return chat_prompt(tok, question, enable_thinking=mode == "trace")

    # ---- the data job: 3 responses per problem and mode from vLLM, best vs worst by the reward model
    requests = record_calls(monkeypatch, VLLMEngine, "generate")
    pairs_dir = tmp_path / "pairs"
    summary = bvpo_data.main(["--model_name_or_path", qwen3_path, "--source", "gsm8k", "--split", "train",
                              "--data_path", str(data), "--limit", "2", "--samples", "3", "--max_tokens", "16",
                              "--empty_max_tokens", "8", "--scorer", random_reward_model(tmp_path / "rm"),
                              "--scorer_format", "reward_model", "--kv_cache_gb", "0.25", "--output_dir", str(pairs_dir)])
    sent = [r for (batch, *_), _, _ in requests for r in batch]
    assert sorted(r.group for r in sent) == sorted(f"{pid}/{m}" for pid in problems for m in ("trace", "empty"))
    for request in sent:
        pid, mode = request.group.split("/")
        text = expected(problems[pid].question, mode)
        assert tok.decode(request.prompt_ids) == text and request.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
        if mode == "empty":  # the empty think block as Qwen's template writes it, as tokens
            assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
            assert request.prompt_ids[-4:] == [think, blank, end_think, blank]
            assert request.sampling.max_tokens == 8
        else:
            assert text.endswith("<|im_start|>assistant\n") and think not in request.prompt_ids
            assert request.sampling.max_tokens == 16
    metrics = json.loads((pairs_dir / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary)) and metrics["scorer"] == "reward_model"
    for mode in ("trace", "empty"):
        assert metrics[mode]["pairs"] == 2 and metrics[mode]["why_no_pairs"] == {}
    pairs, report = load_bvpo_pairs(str(pairs_dir / "pairs.jsonl"))
    assert not len(report) and sorted((p.problem_id, p.mode) for p in pairs) == sorted(
        (pid, m) for pid in problems for m in ("trace", "empty"))
    assert all(p.chosen_score > p.rejected_score and p.prompt == problems[p.problem_id].question for p in pairs)

    # ---- training: each row one trace pair and the empty pair of the same problem, alpha auto
    losses = record_calls(monkeypatch, BVPOTrainer, "compute_loss")
    out = tmp_path / "bvpo"
    bvpo.main(["--model_name_or_path", qwen3_path, "--pairs", str(pairs_dir / "pairs.jsonl"), "--output_dir", str(out),
               "--per_device_train_batch_size", "1", "--max_steps", "2", "--max_length", "128", "--beta", "0.5",
               "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--bvpo_alpha", "auto",
               "--bvpo_alpha_min_samples", "2", "--bvpo_sketch_dim", "1024", "--logging_steps", "1",
               "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"])
    assert len(losses) == 2
    by_key = {(p.problem_id, p.mode): p for p in pairs}
    for (_, inputs), _, _ in losses:
        (pid,) = [pid for pid in problems if tok.decode(split_row(inputs["trace"], 0)[0]) == expected(problems[pid].question, "trace")]
        for mode in ("trace", "empty"):
            batch, pair = inputs[mode], by_key[(pid, mode)]
            prompt, chosen = split_row(batch, 0)
            prompt_again, rejected = split_row(batch, 1)
            assert prompt == prompt_again == tok(expected(pair.prompt, mode), add_special_tokens=False)["input_ids"]
            # whole responses: each ends in Qwen's end of turn, the model's EOS
            assert chosen[-1] == rejected[-1] == tok.eos_token_id and tok.eos_token == IM_END
            assert tok.decode(chosen[:-1]) == pair.chosen and tok.decode(rejected[:-1]) == pair.rejected
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["prompt_style"] == "chat" and metrics["policy"] == qwen3_path
    assert metrics["rows"] == metrics["matched_same_problem"] == 2 and metrics["skipped_rows"] == 0
    assert metrics["alpha_history"][0] == 0.5 and 0.0 <= metrics["alpha_history"][1] <= 1.0
    # policy = reference at the first step: both DPO losses are log 2
    assert metrics["trace_loss_history"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["empty_loss_history"][0] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(x) for x in metrics["trace_loss_history"] + metrics["empty_loss_history"])

    # the checkpoint keeps Qwen's template (both modes render as before), loads, generates, moved
    saved = load_tokenizer(str(out))
    question = problems["gsm8k-train-1"].question
    for mode in ("trace", "empty"):
        assert chat_prompt(saved, question, enable_thinking=mode == "trace") == expected(question, mode)
    assert_loads_and_generates(out, expected(question, "empty"))
    assert moved(out, qwen3_path)


# ---------------------------------------------------------------------------- Q-Tuning

@pytest.mark.slow
def test_qtuning_sft_on_smollm2_gsm8k_rows(tmp_path, monkeypatch, smollm2_path, shared_data):
    tok = load_tokenizer(smollm2_path)
    calls = record_calls(monkeypatch, QTuningTrainer, "_qtune")
    data = shared_data / "gsm8k" / "train.jsonl"
    out = tmp_path / "qtuning"
    # the paper's recipe for SmolLM2 (LoRA r8 on all linear layers, 25% of samples x 50% of tokens),
    # on the 135M model and 8 GSM8K rows in the chat template, two optimizer steps of 4 rows each
    qtuning_sft.main(["--config", str(ROOT / "configs/qtuning_sft/smollm2-1.7b.yaml"), "--model_name_or_path", smollm2_path,
          "--data_path", str(data), "--limit", "8", "--prompt_style", "chat", "--per_device_train_batch_size", "4",
          "--gradient_accumulation_steps", "1", "--max_steps", "2", "--max_length", "256", "--warmup_steps", "0",
          "--gradient_checkpointing", "false", "--save_strategy", "no", "--report_to", "none",
          "--disable_tqdm", "true", "--output_dir", str(out)])
    questions = [p.question for p in load_problems("gsm8k", "train", path=data, limit=8)]
    assert len(calls) == 2
    for (batch,), _, pruned in calls:
        labels, ids = batch["labels"], batch["input_ids"]
        kept = [next(i for i in range(ids.shape[0]) if torch.equal(ids[i, :pruned["input_ids"].shape[1]], row))
                for row in pruned["input_ids"]]
        assert len(kept) == budget(4, 0.25) == 1
        for row in range(ids.shape[0]):
            n = int(batch["attention_mask"][row].sum())
            text = tok.decode(ids[row, :n])
            question = next(q for q in questions if q in text)
            head = chat_prompt(tok, question)
            # the loss covers the solution and the end of the turn, never the ChatML prompt or padding
            trained = (labels[row] != -100).nonzero().flatten()
            assert text.startswith(head) and int(trained[0]) == len(tok(head)["input_ids"]) and int(trained[-1]) == n - 1
            assert tok.decode(labels[row, trained]).endswith(IM_END)
        for r, row in enumerate(kept):
            before, after = labels[row, :pruned["labels"].shape[1]], pruned["labels"][r]
            assert bool(((after == -100) | (after == before)).all())  # kept tokens are the row's own answer tokens
            answer, left = int((before != -100).sum()), int((after != -100).sum())
            assert left in (answer, budget(answer, 0.5))  # all of them, or exactly half (a high-error sample)
            if left < answer:  # the dropped tokens are real BPE pieces of the solution, in place
                dropped = ((before != -100) & (after == -100)).nonzero().flatten()
                assert all(int(ids[row, j]) == int(before[j]) for j in dropped)
    metrics = json.loads((out / "metrics.json").read_text())
    totals = metrics["totals"]
    assert metrics["steps"] == 2 and metrics["num_records"] == 8 and len(metrics["loss_history"]) == 2
    assert all(math.isfinite(x) for x in metrics["loss_history"])
    assert totals["samples"] == 8 and totals["kept_samples"] == 2 and metrics["kept_sample_share"] == 0.25
    assert 0 < totals["loss_tokens"] < totals["answer_tokens"] and totals["backward_tokens"] < totals["scoring_tokens"]
    for h in (h for h in metrics["log_history"] if "loss" in h):
        assert sum(h[f"qtuning/{k}"] for k in ("q1_harmful_noise", "q2_misconception", "q3_redundant",
                                              "q4_calibration", "unassigned")) == 4
    # LoRA merged into a plain SmolLM2 checkpoint that loads, generates, and moved
    assert (out / "adapter" / "adapter_config.json").exists()
    assert moved(out, smollm2_path)
    assert load_tokenizer(str(out)).chat_template == tok.chat_template
    assert_loads_and_generates(out, chat_prompt(tok, "What is 2 + 3?"))


def test_bvpo_pairs_never_pick_a_blank_response(tmp_path):
    """Break: a blank response (an immediate EOS, which real models give in the answer-only mode)
    could become `chosen` or `rejected`, and the pair file then failed to load in launch/bvpo.py
    (`load_bvpo_pairs` refuses empty texts). Blank responses are left out of the ranking."""
    assert pick_pair([0.9, 0.1, 0.5, 0.0], ["a", "b", "c", ""], 1e-6) == (0, 1)
    assert pick_pair([2.0, 0.1, 0.5], [" \n", "b", "c"], 1e-6) == (2, 1)
    assert pick_pair([1.0, 0.0], ["a", ""], 1e-6) == "fewer than 2 responses with text"
    assert pick_pair([0.3, 0.3, 0.0], ["a", "b", ""], 1e-6).startswith("no spread")
    # why: the reader refuses what the builder used to write
    write_bvpo_pairs([BVPOPair(prompt="Q", chosen="a", rejected="", mode="empty")], tmp_path / "pairs.jsonl")
    with pytest.raises(DataError, match="rejected"):
        load_bvpo_pairs(str(tmp_path / "pairs.jsonl"))


def test_mcts_dpo_warns_when_no_pair_carries_a_preference(caplog):
    """Break: on SmolLM2 with outcome-only values (no --scorer) every pair's chosen step had been
    visited less than its rejected one, so every visit smoothing was 0.5, cDPO's gradient was zero
    and the round trained to exactly the starting weights (loss ln 2 throughout) without a word."""
    tree = ReasoningTree(problem_id="p", prompt="Q\n", prompt_ids=[1], answer="5", problem={"question": "Q"},
                         sampler={"terminal_value": "verifier"})
    tree.root.scores.update(visits=5, q=-0.6)
    tree.add(0, "a\n\n", [2], visits=1, q=0.0, value=0.0)  # the higher Q, visited less: smoothing 0.5
    low = tree.add(0, "b\n\n", [3], visits=4, q=-0.75, value=0.0)
    tree.add(low.id, "\\boxed{4}", [4], "boxed", visits=1, q=-1.0, value=-1.0, search_pick=1.0, outcome=0.0)
    pairs, summary = mcts_pairs([tree], correct_only=False)
    assert [p.extra["label_smoothing"] for p in pairs] == [0.5] and visit_smoothing(1, 4) == 0.5
    with caplog.at_level("WARNING"):
        assert warn_if_no_preference(summary, conservative=True)
    assert "cDPO learns nothing" in caplog.text and "--conservative false" in caplog.text
    assert not warn_if_no_preference(summary, conservative=False)
    assert not warn_if_no_preference({**summary, "label_smoothing_at_cap": 0}, conservative=True)
