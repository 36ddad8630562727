"""MCTS-DPO: pairs and visit-count smoothing on a hand-built tree, the per-pair smoothing in the
loss, one real round on the tiny policy (vLLM search, cDPO training), and resuming a stopped run."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from treetune.rollouts.tree import ReasoningTree
from treetune.trainers.mcts_dpo.pairs import mcts_pairs, tree_pairs, visit_smoothing

ROOT = Path(__file__).resolve().parents[1]


def hand_tree(outcome: float = 1.0) -> ReasoningTree:
    """root -> A (q .8, N 6), B (q -.5, N 2), C (q .1, N 2); A -> A1 (picked, right), A2 -> A2a (an only child)."""
    t = ReasoningTree(problem_id="p1", prompt="Q: 2+3?\n", prompt_ids=[5, 6, 7], answer="5",
                      problem={"question": "2+3?"}, sampler={"terminal_value": "verifier"})
    t.root.scores.update(visits=10, q=0.3)
    a = t.add(0, "2+3=5\n", [11, 12], visits=6, q=0.8, prior=0.5, value=1.0)
    t.add(0, "2+3=6\n", [13], visits=2, q=-0.5, prior=0.5, value=-1.0)
    t.add(0, "2*3=6\n", [14], visits=2, q=0.1, prior=0.5, value=0.0)
    t.add(a.id, "\\boxed{5}", [21], "boxed", visits=3, q=1.0, prior=0.4, value=1.0, search_pick=1.0, outcome=outcome)
    a2 = t.add(a.id, "so\n", [22], visits=2, q=-0.9, prior=0.4, value=-0.8)
    t.add(a2.id, "\\boxed{6}", [23], "boxed", visits=1, q=-1.0, prior=0.9, value=-1.0, outcome=0.0)
    return t


def test_visit_smoothing_formula():
    assert visit_smoothing(6, 2) == pytest.approx(0.25)
    assert visit_smoothing(3, 2) == pytest.approx(0.4)
    assert visit_smoothing(1, 5) == 0.5  # clipped: a rarely visited winner is no preference at all
    assert visit_smoothing(9, 0) == 0.0
    assert visit_smoothing(0, 0) == 0.5


def test_pairs_along_selected_path():
    pairs = tree_pairs(hand_tree(), rejected="lowest")
    assert [(p.chosen, p.rejected) for p in pairs] == [("2+3=5\n", "2+3=6\n"), ("\\boxed{5}", "so\n\\boxed{6}")]
    root_pair, a_pair = pairs
    assert root_pair.initial_reason_steps == "" and a_pair.initial_reason_steps == "2+3=5\n"
    assert root_pair.extra["label_smoothing"] == pytest.approx(1 - 6 / 8)
    assert a_pair.extra["label_smoothing"] == pytest.approx(1 - 3 / 5)
    # the tree's own tokens: prompt + selected prefix, and the rejected chain through the only child
    assert a_pair.extra["prompt_ids"] == [5, 6, 7, 11, 12]
    assert a_pair.extra["chosen_ids"] == [21] and a_pair.extra["rejected_ids"] == [22, 23]
    assert (root_pair.chosen_value, root_pair.rejected_value) == (0.8, -0.5)


def test_random_rejected_is_a_non_best_candidate():
    seen = {tree_pairs(hand_tree(), rejected="random", rng=random.Random(s))[0].rejected for s in range(30)}
    assert seen == {"2+3=6\n", "2*3=6\n"}
    with pytest.raises(ValueError, match="rejected"):
        tree_pairs(hand_tree(), rejected="worst")


def test_correct_only_filter_and_gap():
    pairs, summary = mcts_pairs([hand_tree(outcome=0.0), hand_tree()], correct_only=True)
    assert summary["why_no_pairs"] == {"selected answer wrong (filtered)": 1} and len(pairs) == 2
    pairs, _ = mcts_pairs([hand_tree(outcome=0.0)], correct_only=False)
    assert len(pairs) == 2
    assert len(tree_pairs(hand_tree(), min_q_gap=1.5)) == 1  # only the root pair's Q gap (1.9) clears it


def test_blank_candidate_is_no_step():
    """An immediate EOS (no text) is left out: here the lowest-Q candidate, so the next one is rejected."""
    t = hand_tree()
    t.add(0, "", [2], "eos", visits=1, q=-1.0, prior=0.9, value=-1.0)
    root_pair = tree_pairs(t)[0]
    assert (root_pair.chosen, root_pair.rejected) == ("2+3=5\n", "2+3=6\n")


def _sequence_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    per_token = logits.gather(-1, targets[:, None])[:, 0]
    return per_token[len(prompt_ids) - 1:].sum()


def test_per_pair_smoothing_reaches_the_loss(tiny_policy_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treetune.data.step_pairs import StepPair
    from treetune.trainers.mcts_dpo.config import MCTSDPOConfig
    from treetune.trainers.mcts_dpo.trainer import MCTSDPOTrainer, pair_rows

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_policy_path, dtype=torch.float32)
    with torch.no_grad():  # move the policy away from the reference so every h is non-zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    texts = [("Q: 3 + 4 =", " 7\n", " 8\n"), ("Q: 9 - 2 =", " 7\n", " 6\n"),
             ("Q: 5 * 3 =", " 15\n", " 35\n"), ("Q: 8 + 8 =", " 16\n", " 18 and\n")]
    eps = [0.0, 0.2, 0.4, 0.5]
    pairs = []
    for (prompt, chosen, rejected), e in zip(texts, eps):
        ids = {k: tokenizer(t, add_special_tokens=False)["input_ids"] for k, t in
               (("prompt_ids", prompt), ("chosen_ids", chosen), ("rejected_ids", rejected))}
        pairs.append(StepPair(prompt=prompt, initial_reason_steps="", chosen=chosen, rejected=rejected,
                              extra={**ids, "label_smoothing": e}))
    dataset, _ = pair_rows(pairs, max_length=128, max_prompt_length=64, conservative=True)
    config = MCTSDPOConfig(output_dir=str(tmp_path), beta=0.5, per_device_train_batch_size=4, report_to=[], bf16=False,
                           max_length=128, ref_model_path=tiny_policy_path)
    trainer = MCTSDPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=dataset, processing_class=tokenizer)
    examples = [dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    assert batch["label_smoothing"].tolist() == pytest.approx(eps)
    loss = trainer.compute_loss(trainer.model, dict(batch)).item()

    beta, expected, plain = 0.5, [], []
    for row, e in zip(examples, eps):
        h = ((_sequence_logps(policy, row["prompt_ids"], row["chosen_ids"]) - _sequence_logps(ref, row["prompt_ids"], row["chosen_ids"]))
             - (_sequence_logps(policy, row["prompt_ids"], row["rejected_ids"]) - _sequence_logps(ref, row["prompt_ids"], row["rejected_ids"]))).item()
        assert abs(h) > 1e-2
        logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
        expected.append(-(1 - e) * logsig(beta * h) - e * logsig(-beta * h))
        plain.append(-logsig(beta * h))
    assert loss == pytest.approx(sum(expected) / 4, abs=1e-4)
    assert abs(sum(expected) - sum(plain)) / 4 > 1e-3  # the smoothing changed the loss measurably

    # the same pairs with smoothing off give TRL's plain sigmoid loss
    batch["label_smoothing"] = torch.zeros(4)
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(sum(plain) / 4, abs=1e-4)
    # and gradients flow through the smoothing term
    policy.zero_grad()
    batch["label_smoothing"] = torch.tensor(eps)
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


@pytest.fixture(scope="module")
def one_round(tmp_path_factory, tiny_policy_path):
    """One real round (vLLM MCTS on a few arith problems, pairs, cDPO) into a fresh output dir."""
    from treetune.trainers.mcts_dpo.loop import main

    out = tmp_path_factory.mktemp("mcts_dpo")
    argv = ["--config", str(ROOT / "configs/mcts_dpo/arith.yaml"), "--output_dir", str(out), "--problems_per_round", "24",
            "--mcts_iterations", "3", "--search_width", "2", "--eval_limit", "0", "--kv_cache_gb", "0.25",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-4", "--disable_tqdm", "true",
            "--correct_only", "false"]
    metrics = main(argv + ["--rounds", "1"])
    return out, argv, metrics


@pytest.mark.slow
def test_one_round_end_to_end(one_round, tiny_policy_path):
    from safetensors.torch import load_file
    from treetune.data.step_pairs import load_step_pairs
    from treetune.rollouts.tree_io import read_trees

    out, _, metrics = one_round
    r0 = out / "round_0"
    state = json.loads((r0 / "state.json").read_text())
    assert state["done"] == ["search", "pairs", "train"]
    trees = list(read_trees(r0 / "search" / "trees"))
    assert len(trees) == 24 and all(t.root.scores["visits"] > 0 for t in trees)
    pairs, _ = load_step_pairs(str(r0 / "pairs.jsonl"))
    assert pairs and metrics["rounds"][0]["pairs"] == len(pairs)
    assert all(0.0 <= p.extra["label_smoothing"] <= 0.5 for p in pairs)
    assert all(p.chosen_value > p.rejected_value for p in pairs)
    train = json.loads((r0 / "model" / "metrics.json").read_text())
    assert train["steps"] >= 1 and train["reference"] == tiny_policy_path and train["policy"] == tiny_policy_path
    new, old = load_file(str(r0 / "model" / "model.safetensors")), load_file(f"{tiny_policy_path}/model.safetensors")
    assert any(not torch.equal(new[k].float(), old[k].float()) for k in old if k in new)  # the policy moved


@pytest.mark.slow
def test_resume_after_stop_between_rounds(one_round, tiny_policy_path):
    from treetune.trainers.mcts_dpo.loop import main

    out, argv, _ = one_round
    r0 = out / "round_0"
    before = {p: p.stat().st_mtime_ns for p in [*r0.rglob("*.jsonl"), *r0.glob("model/*")]}
    metrics = main(argv + ["--rounds", "2"])  # the run "stopped" after round 0; now it goes on to round 1
    assert {p: p.stat().st_mtime_ns for p in before} == before  # round 0 was not redone
    train = json.loads((out / "round_1" / "model" / "metrics.json").read_text())
    assert train["policy"] == str(r0 / "model")  # round 1 starts from round 0's checkpoint ...
    assert train["reference"] == tiny_policy_path  # ... against the starting policy
    assert [r["stages_done"] for r in metrics["rounds"]] == [["search", "pairs", "train"]] * 2

    # a stop inside round 1 after its search: only the later stages are redone, the trees are kept
    r1 = out / "round_1"
    state = json.loads((r1 / "state.json").read_text())
    state["done"] = ["search"]
    (r1 / "state.json").write_text(json.dumps(state))
    trees_before = {p: p.stat().st_mtime_ns for p in (r1 / "search" / "trees").glob("*")}
    metrics = main(argv + ["--rounds", "2"])
    assert {p: p.stat().st_mtime_ns for p in trees_before} == trees_before
    assert metrics["rounds"][1]["stages_done"] == ["search", "pairs", "train"]
