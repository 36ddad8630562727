"""PRM label placement, the step loss, a short training run whose loss falls, and scoring."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from treetune.data.arith import arith_problems, check_solution
from treetune.data.steps import split_steps
from treetune.rewards.labels.formats import write_stepwise
from treetune.trainers.prm.trainer import IGNORE, step_loss, tokenize_stepwise

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tiny_policy_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy_path)


def test_labels_sit_on_the_last_separator_token(tokenizer):
    record = {"prompt": "Mia has 7 pens.\n", "completions": ["7+15=22", "The answer is \\boxed{22}"], "labels": [True, 0.25]}
    row = tokenize_stepwise(record, tokenizer, separator="\n")
    labelled = [i for i, l in enumerate(row["labels"]) if l != IGNORE]
    assert [row["labels"][i] for i in labelled] == [1.0, 0.25]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert all(row["input_ids"][i] == newline[-1] for i in labelled)
    # "15" and "22" are split over digit tokens; the label still lands after the whole step
    first_step = tokenizer("7+15=22", add_special_tokens=False)["input_ids"]
    prompt = tokenizer("Mia has 7 pens.\n", add_special_tokens=False)["input_ids"]
    assert labelled[0] == len(prompt) + len(first_step)
    # a separator of several tokens: the label is on its last one
    multi = tokenize_stepwise(record, tokenizer, separator=" STEP\n")
    sep_ids = tokenizer(" STEP\n", add_special_tokens=False)["input_ids"]
    assert len(sep_ids) > 1
    positions = [i for i, l in enumerate(multi["labels"]) if l != IGNORE]
    assert all(multi["input_ids"][i - len(sep_ids) + 1: i + 1] == sep_ids for i in positions)


def test_step_loss_hard_and_soft():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]]])
    labels = torch.tensor([[0.0, IGNORE, 1.0]])
    expected = torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1]))
    assert torch.isclose(step_loss(logits, labels, soft=False), expected)
    soft = torch.tensor([[0.25, IGNORE, 1.0]])
    p1 = torch.softmax(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), -1)[:, 1]
    bce = -(torch.tensor([0.25, 1.0]) * p1.log() + torch.tensor([0.75, 0.0]) * (1 - p1).log()).mean()
    assert torch.isclose(step_loss(logits, soft, soft=True), bce, atol=1e-5)


def arith_records(count: int, seed: int) -> list[dict]:
    """Gold solutions and copies with one corrupted step, labelled by the exact checker."""
    rng = random.Random(seed)
    records = []
    for problem in arith_problems("train", count):
        steps = split_steps(problem.solution, "line")
        if rng.random() < 0.5:
            i = rng.randrange(len(steps) - 1)
            steps[i] = steps[i].replace("=", f"={rng.randint(1, 9)}", 1)
        first_wrong = check_solution(problem, "\n".join(steps))
        labels = [first_wrong == -1 or i < first_wrong for i in range(len(steps))]
        records.append({"prompt": problem.question + "\n", "completions": steps, "labels": labels})
    return records


@pytest.mark.slow
def test_short_training_run_loss_falls_and_scores(tmp_path, tiny_policy_path):
    write_stepwise(arith_records(768, 0), tmp_path / "labels.jsonl")
    out = tmp_path / "prm"
    command = [sys.executable, str(ROOT / "launch" / "train_prm.py"), "--config", str(ROOT / "configs" / "train_prm" / "arith.yaml"),
               "--train_file", str(tmp_path / "labels.jsonl"), "--output_dir", str(out), "--logging_steps", "4",
               "--num_train_epochs", "1", "--learning_rate", "0.001",
               "--disable_tqdm", "true"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads((out / "metrics.json").read_text())["loss_history"]
    assert len(losses) >= 4 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2

    from treetune.rewards.scorers.discriminative import DiscriminativePRM

    prm = DiscriminativePRM(str(out))
    problem = arith_problems("test", 1)[0]
    steps = split_steps(problem.solution, "line")
    scores = prm.score([problem.question, problem.question], [steps, steps[:2]])
    assert [len(s) for s in scores] == [len(steps), 2]
    assert all(0.0 <= x <= 1.0 for s in scores for x in s)

    # the recipe fuses the head with the backbone's likelihood, fitted on held-out records
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["records"] + metrics["fusion_records"] == 768 and metrics["fusion_records"] == 77
    fusion = json.loads((out / "fusion.json").read_text())
    assert fusion["features"] == ["head_logit", "step_min_logp", "step_mean_logp", "prefix_min_logp"]
    assert fusion["fit_loss"] < fusion["prior_loss"]
    head_only = DiscriminativePRM(str(out), fusion=False).score([problem.question], [steps])
    assert head_only != scores[:1]


def test_step_spans_cover_each_step_without_its_separator(tokenizer):
    record = {"prompt": "Mia has 7 pens.\n", "completions": ["7+15=22", "22-5=17", "The answer is \\boxed{17}"],
              "labels": [True, False, False]}
    row = tokenize_stepwise(record, tokenizer, separator="\n", spans=True)
    assert len(row["step_spans"]) == 3
    for (a, b), step in zip(row["step_spans"], record["completions"]):
        assert tokenizer.decode(row["input_ids"][a:b]) == step
    # a cut at max_length keeps the spans of the steps whose label survived
    cut = tokenize_stepwise(record, tokenizer, separator="\n", max_length=row["step_spans"][1][1] + 1, spans=True)
    assert len(cut["step_spans"]) == 2 == sum(1 for l in cut["labels"] if l != IGNORE)


def test_fusion_fit_recovers_a_known_logistic_model(tmp_path):
    import numpy as np
    from treetune.rewards.scorers import fusion as prm_fusion

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 2)) * [1.0, 3.0] + [0.0, -2.0]
    truth_w, truth_b = np.array([1.5, -0.5]), 0.3
    y = (rng.random(20000) < 1 / (1 + np.exp(-(x @ truth_w + truth_b)))).astype(float)
    fusion = prm_fusion.fit(x.tolist(), y.tolist(), ["head_logit", "step_min_logp"], l2=0.0)
    assert np.allclose(fusion["weights"], truth_w, atol=0.1) and abs(fusion["bias"] - truth_b) < 0.1
    assert fusion["fit_loss"] < fusion["prior_loss"]
    p = prm_fusion.apply(fusion, [[0.0, 0.0], [2.0, 0.0]])
    assert p[0] == pytest.approx(1 / (1 + np.exp(-fusion["bias"])))
    assert p[1] > p[0]
    with pytest.raises(ValueError, match="labels are all"):
        prm_fusion.fit([[0.0]] * 20, [1.0] * 20, ["head_logit"])
    with pytest.raises(ValueError, match="do not match"):
        prm_fusion.fit([[0.0, 1.0]] * 20, [1.0] * 20, ["head_logit"])
    (tmp_path / prm_fusion.FUSION_FILE).write_text(json.dumps({"features": ["mystery"], "weights": [1.0], "bias": 0.0}))
    with pytest.raises(ValueError, match="fusion.json"):
        prm_fusion.load(tmp_path)


def test_step_log_probs_match_one_row_at_a_time(tokenizer, tiny_policy_path):
    from transformers import AutoModelForCausalLM
    from treetune.rewards.scorers.fusion import likelihood_features, step_log_probs

    model = AutoModelForCausalLM.from_pretrained(tiny_policy_path).eval()
    problems = arith_problems("test", 3)
    rows = [tokenize_stepwise({"prompt": p.question + "\n", "completions": split_steps(p.solution, "line"),
                               "labels": [1.0] * len(split_steps(p.solution, "line"))}, tokenizer, spans=True) for p in problems]
    batched = step_log_probs(model, rows, tokenizer.pad_token_id or tokenizer.eos_token_id, batch_size=3)
    for row, together in zip(rows, batched):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        for (a, b), (low, mean) in zip(row["step_spans"], together):
            token_logp = [logp[j - 1, row["input_ids"][j]].item() for j in range(a, b)]
            assert low == pytest.approx(min(token_logp), abs=1e-4) and mean == pytest.approx(sum(token_logp) / len(token_logp), abs=1e-4)
    features = likelihood_features([(-1.0, -0.5), (-3.0, -1.0), (-2.0, -0.2)])
    assert [f[2] for f in features] == [-1.0, -3.0, -3.0]


@pytest.mark.slow
def test_fused_prm_under_zero3_with_two_processes(tmp_path, tiny_policy_path):
    """The recipe under DeepSpeed ZeRO-3 (2 processes, gloo): the saved head loads whole and the
    fusion is fitted after the other rank has left."""
    import os

    from treetune.trainers.distributed import launch_command

    write_stepwise(arith_records(256, 1), tmp_path / "labels.jsonl")
    out = tmp_path / "prm"
    command = launch_command(ROOT / "configs" / "accelerate" / "zero3.yaml",
                             ["launch/train_prm.py", "--config", "configs/train_prm/arith.yaml", "--train_file", str(tmp_path / "labels.jsonl"),
                              "--output_dir", str(out), "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
                              "--disable_tqdm", "true"], num_processes=2)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fusion_records"] == 26 and metrics["fusion"]["fit_loss"] < metrics["fusion"]["prior_loss"]

    from treetune.rewards.scorers.discriminative import DiscriminativePRM

    problem = arith_problems("test", 1)[0]
    steps = split_steps(problem.solution, "line")
    scores = DiscriminativePRM(str(out)).score([problem.question], [steps])
    assert len(scores[0]) == len(steps) and all(0.0 <= x <= 1.0 for x in scores[0])
