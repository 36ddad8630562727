"""The training jobs on a real pretrained LLM: SFT, PRM training, Step-DPO (under ZeRO-3 with 2
processes) and the main job, each run as a user runs it on SmolLM2-135M-Instruct (Llama
architecture, 49,152-token BPE, ChatML template; `treetune.data.pretrained.smollm2`) and real
GSM8K / Math-Shepherd rows, at a size that fits two CPU cores. What each checks is what a user
would look at: the chat template in the training input ids, the loss on the completion tokens
only, PRM labels on the separator token, the run files, and the trained model serving in vLLM.
The fast tests at the end pin the bugs those runs found."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from treetune.data import load_problems
from treetune.data.answers import extract_answer, gsm8k_boxed_solution
from treetune.data.step_pairs import StepPair, write_step_pairs
from treetune.rewards.labels.formats import read_stepwise
from treetune.rewards.scorers.discriminative import IGNORE, tokenize_stepwise
from treetune.trainers.common import load_tokenizer
from treetune.trainers.step_dpo.pairs import raw_steps

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2)


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


def spy(monkeypatch, cls, method: str = "compute_loss") -> list[dict]:
    """Record a copy of the tensors of every batch `cls.method(self, model, inputs, ...)` receives;
    the real method then runs unchanged."""
    seen: list[dict] = []
    real = getattr(cls, method)

    def recording(self, model, inputs, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in inputs.items() if hasattr(v, "detach")})
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(cls, method, recording)
    return seen


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_run_files(out: Path, steps: int, **recipe) -> dict:
    """metrics.json and recipe.json as a user reads them: the steps taken, finite losses, the recipe asked for."""
    metrics = read_json(out / "metrics.json")
    assert metrics["steps"] == steps
    assert len(metrics["loss_history"]) == steps and all(math.isfinite(x) for x in metrics["loss_history"])
    written = read_json(out / "recipe.json")
    for name, value in recipe.items():
        assert written[name] == value, name
    return metrics


def assert_float32_weights(out: Path) -> None:
    """The trainers keep float32 weights on a CPU (TRL's ModelConfig default, bf16 switched off by the recipe parser)."""
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


# ---------------------------------------------------------------------------- SFT

@pytest.mark.slow
def test_sft_on_gsm8k_rows_in_the_chat_template(tmp_path, monkeypatch, smollm2_path, smol_tokenizer, shared_data):
    from treetune.trainers.sft.trainer import main
    from trl import SFTTrainer

    batches = spy(monkeypatch, SFTTrainer)
    out = tmp_path / "sft"
    main(["--model_name_or_path", smollm2_path, "--source", "gsm8k", "--data_path", str(shared_data / "gsm8k" / "train.jsonl"),
          "--limit", "2", "--prompt_style", "chat", "--max_steps", "2", "--per_device_train_batch_size", "1",
          "--max_length", "256", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
          "--disable_tqdm", "true", "--output_dir", str(out)])
    tok = smol_tokenizer
    problems = load_problems("gsm8k", "train", path=shared_data / "gsm8k" / "train.jsonl", limit=2)
    assert len(batches) == 2
    for batch in batches:
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        text = tok.decode(ids)
        # ChatML as SmolLM2's template writes it: the instruction as the system turn, the question as the user's
        assert text.startswith("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                               "\\boxed{}.<|im_end|>\n<|im_start|>user\n")
        problem = next(p for p in problems if p.question in text)
        head = tok.apply_chat_template(
            [{"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
             {"role": "user", "content": problem.question}], tokenize=False, add_generation_prompt=True)
        assert head.endswith("<|im_start|>assistant\n") and text.startswith(head)
        # the loss covers exactly the solution and the end of the turn: no prompt token, no padding
        trained = (labels != -100).nonzero().flatten()
        assert int(trained[0]) == len(tok(head)["input_ids"]) and int(trained[-1]) == len(ids) - 1
        assert tok.decode(labels[trained]) == gsm8k_boxed_solution(problem.solution) + "<|im_end|>"
        # GSM8K's gold answer in the format the instruction asks for, calculator notes gone
        assert "<<" not in text and "####" not in text and f"\\boxed{{{problem.answer}}}" in text
    assert_run_files(out, 2, source="gsm8k", prompt_style="chat", model_name_or_path=smollm2_path)
    assert read_json(out / "metrics.json")["num_records"] == 2
    assert_float32_weights(out)
    assert load_tokenizer(str(out)).chat_template == tok.chat_template


# ---------------------------------------------------------------------------- PRM

@pytest.mark.slow
def test_prm_on_real_bpe_labels_sit_on_the_separator(tmp_path, monkeypatch, smollm2_path, smol_tokenizer, shared_data):
    """Math-Shepherd rows, separator "\\n\\n": under SmolLM2's BPE "\\n\\n" is one token alone but two
    "\\n" tokens before a word and one " \\n\\n" token after a space, so the trainer tokenizes step by
    step; every label must sit on a "\\n\\n" token right after its step's text."""
    from treetune.rewards.scorers.discriminative import DiscriminativePRM
    from treetune.trainers.prm.trainer import PRMTrainer, main

    tok = smol_tokenizer
    (sep,) = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert sep not in tok("lessons.\n\nStep 2", add_special_tokens=False)["input_ids"]  # the merge the trainer avoids

    source = shared_data / "prm_samples" / "samples_math-shepherd.jsonl"
    records = read_stepwise(source, "math_shepherd")
    batches = spy(monkeypatch, PRMTrainer)
    out = tmp_path / "prm"
    main(["--model_name_or_path", smollm2_path, "--train_file", str(source), "--data_format", "math_shepherd",
          "--separator", "\n\n", "--max_length", "256", "--max_steps", "2", "--per_device_train_batch_size", "1",
          "--learning_rate", "1e-4", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
          "--disable_tqdm", "true", "--output_dir", str(out)])
    assert len(batches) == 2
    for batch in batches:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            ids = ids[mask.bool()].tolist()
            labels = labels[mask.bool()].tolist()
            record = next(r for r in records if tok.decode(ids).startswith(r["prompt"]))
            assert ids[0] != tok.bos_token_id  # no stray ChatML `<|im_start|>` opening the PRM's input
            positions = [i for i, label in enumerate(labels) if label != IGNORE]
            assert positions and all(ids[i] == sep for i in positions)
            assert [bool(labels[i]) for i in positions] == record["labels"][:len(positions)]
            starts = [len(tok(record["prompt"])["input_ids"])] + [i + 1 for i in positions[:-1]]
            for start, end, step in zip(starts, positions, record["completions"]):
                assert tok.decode(ids[start:end]) == step
            assert "ки" not in tok.decode(ids)
    metrics = assert_run_files(out, 2, separator="\n\n", data_format="math_shepherd")
    assert metrics["records"] == len(records) == 7
    # the saved PRM scores solutions, reading the same positions
    problem, steps = records[0]["prompt"], records[0]["completions"]
    scores = DiscriminativePRM(str(out), separator="\n\n", max_length=256).score([problem], [steps])
    assert len(scores[0]) == len(steps) and all(0.0 < s < 1.0 for s in scores[0])


# ---------------------------------------------------------------------------- Step-DPO, ZeRO-3 on 2 processes

def gsm8k_step_pairs(path: Path, count: int) -> list[StepPair]:
    """The gold step of a GSM8K solution against the same step with its result off by one."""
    pairs = []
    for problem in load_problems("gsm8k", "train", path=path, limit=count):
        steps = raw_steps(gsm8k_boxed_solution(problem.solution), "\n")
        good = steps[1]
        number = next(w for w in reversed(good.replace(".", " ").split()) if w.isdigit())
        bad = good[::-1].replace(number[::-1], str(int(number) + 1)[::-1], 1)[::-1]
        pairs.append(StepPair(prompt=problem.question, initial_reason_steps=steps[0], chosen=good, rejected=bad,
                              answer=problem.answer, problem_id=problem.id, step_index=1))
    return pairs


@pytest.mark.slow
def test_step_dpo_under_zero3_on_two_processes(tmp_path, smollm2_path, smol_tokenizer, shared_data):
    """`accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 2 launch/step_dpo.py`
    on GSM8K step pairs in the chat template: weights sharded over two gloo ranks, gathered at the end
    into one checkpoint shaped as the start (the main job's test serves a Step-DPO model in vLLM)."""
    from treetune.trainers.distributed import launch_command
    from treetune.trainers.step_dpo.trainer import build_step_dataset

    pairs = gsm8k_step_pairs(shared_data / "gsm8k" / "train.jsonl", 4)
    pairs_path = tmp_path / "pairs.jsonl"
    write_step_pairs(pairs, pairs_path)
    tok = smol_tokenizer
    # the rows the trainer builds: the chat-rendered problem and the correct prefix, then one step each
    dataset, _ = build_step_dataset(pairs, tok, "chat", 256, 192)
    for row, pair in zip(dataset, pairs):
        prompt = tok.decode(row["prompt_ids"])
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
            f"<|im_start|>assistant\n{pair.initial_reason_steps}")
        assert tok.decode(row["chosen_ids"]) == pair.chosen and tok.decode(row["rejected_ids"]) == pair.rejected

    out = tmp_path / "dpo"
    command = launch_command(ROOT / "configs" / "accelerate" / "zero3.yaml", [
        str(ROOT / "launch" / "step_dpo.py"), "--model_name_or_path", smollm2_path, "--pairs", str(pairs_path),
        "--prompt_style", "chat", "--max_steps", "2", "--per_device_train_batch_size", "1", "--max_length", "256",
        "--max_prompt_length", "192", "--beta", "0.5", "--learning_rate", "1e-5", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out)],
        num_processes=2)
    env = dict(os.environ, TREETUNE_LOG="WARNING", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    metrics = assert_run_files(out, 2, prompt_style="chat", model_name_or_path=smollm2_path, max_length=256)
    assert metrics["world_size"] == 2 and metrics["pairs"] == 4 and metrics["prompt_style"] == "chat"
    assert metrics["loss_history"][0] == pytest.approx(LN2, abs=1e-3)  # policy == reference at the first step
    assert metrics["prompt_truncated"] == 0 and metrics["too_long"] == 0

    # the gathered ZeRO-3 checkpoint: whole float32 tensors, shaped as the start, moved by training
    from safetensors.torch import load_file

    saved, start = load_file(str(out / "model.safetensors")), load_file(str(Path(smollm2_path) / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in start.items()}
    assert any((saved[k] - start[k]).abs().max() > 0 for k in saved)
    assert_float32_weights(out)


# ---------------------------------------------------------------------------- the main job

@pytest.mark.slow
def test_main_job_on_smollm2(tmp_path, smollm2_path, smol_tokenizer):
    """`launch/main.py --model_name_or_path <SmolLM2>` at a tiny size: every stage runs on the real model,
    in its chat template, and the Step-DPO model it trains serves in vLLM in the evaluation after.
    SmolLM2-135M solves next to no arith problem here, so sibling values rarely differ: a pair margin
    of 0 lets the pairs stage hand its branching steps on to Step-DPO, so that every stage runs."""
    from treetune.rollouts.tree_io import read_trees

    out = tmp_path / "main"
    argv = ["--config", "configs/main/arith.yaml", "--output_dir", str(out), "--model_name_or_path", smollm2_path,
            "--eval_problems", "1", "--bon_problems", "1", "--n", "2", "--train_problems", "1", "--trajectories", "4",
            "--segment_tokens", "16", "--max_depth", "4", "--max_tokens", "64", "--prm_trees", "1", "--prm_k", "1",
            "--prm_epochs", "1", "--prm_fusion", "false", "--pair_margin", "0", "--dpo_batch_size", "2",
            "--rl_steps", "1", "--rl_trees_per_step", "1", "--rl_generations", "2"]
    done = subprocess.run([sys.executable, "launch/main.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    stages = {s: read_json(out / s / "stage.json") for s in ("policy", "eval_before", "trees", "prm_labels", "treepo",
                                                                "eval_treepo", "prm", "pairs", "step_dpo", "eval_after",
                                                                "report")}
    assert stages["treepo"]["steps"] == 1 and stages["treepo"]["trees"] == 1 and "--prompt_style chat" in stages["treepo"]["command"]
    assert stages["policy"]["prompt_style"] == "chat"
    im_start = smol_tokenizer.convert_tokens_to_ids("<|im_start|>")
    for folder in ("eval_before", "trees", "eval_after"):
        trees = list(read_trees(out / folder / "trees"))
        assert trees and all(t.prompt.startswith("<|im_start|>system\nPlease reason step by step") and
                             t.prompt.endswith("<|im_start|>assistant\n") and t.prompt_ids.count(im_start) == 3
                             for t in trees), folder
    assert all(len(t.leaves()) == 4 for t in read_trees(out / "trees" / "trees"))
    labels = [json.loads(line) for line in (out / "prm_labels" / "labels.jsonl").read_text().splitlines()]
    assert labels and all(len(r["completions"]) == len(r["labels"]) > 0 for r in labels)
    assert stages["prm"]["records"] == len(labels) and (out / "prm" / "model" / "model.safetensors").exists()
    assert stages["pairs"]["pairs"] > 0
    dpo = read_json(out / "step_dpo" / "model" / "metrics.json")
    assert dpo["prompt_style"] == "chat" and dpo["steps"] >= 1 and math.isfinite(dpo["train_loss"])
    assert dpo["pairs"] == stages["pairs"]["pairs"]
    # the trained policy, loaded by vLLM, wrote the evaluation after: greedy and sampled solutions
    after = stages["eval_after"]
    assert after["model"] == str(out / "step_dpo" / "model")
    greedy = read_json(out / "eval_after" / "greedy_metrics.json")
    assert greedy["problems"] == 1 and greedy["mean_tokens"] > 8
    texts = [t.path_text(leaf.id) for t in read_trees(out / "eval_after" / "trees") for leaf in t.leaves()]
    assert len(texts) == 2 and all(sum(c.isalpha() for c in text) > 20 for text in texts), texts
    report = (out / "report" / "report.md").read_text()
    assert "| greedy |" in report and str(out / "pairs" / "pairs.jsonl") in report


# ---------------------------------------------------------------------------- fast: the bugs these runs found

def test_gsm8k_solutions_train_in_the_boxed_format(shared_data):
    from treetune.trainers.sft.config import SFTScriptArguments
    from treetune.trainers.sft.trainer import training_records

    raw = "She sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 1,072"
    assert gsm8k_boxed_solution(raw) == "She sold 48/2 = 24 clips.\nIn all 48+24 = 72.\nThe answer is \\boxed{1072}."
    assert extract_answer(gsm8k_boxed_solution(raw)) == "1072"
    args = SFTScriptArguments(source="gsm8k", data_path=str(shared_data / "gsm8k" / "train.jsonl"), limit=20,
                              prompt_style="plain")
    records = training_records(args)
    problems = load_problems("gsm8k", "train", path=shared_data / "gsm8k" / "train.jsonl", limit=20)
    for record, problem in zip(records, problems):
        assert "<<" not in record["completion"] and "####" not in record["completion"]
        assert extract_answer(record["completion"]) == problem.answer


def test_a_checkpoint_without_a_tokenizer_is_refused_by_name(tmp_path, tiny_policy_path):
    from treetune.trainers.common import TOKENIZER_FILES

    folder = tmp_path / "weights_only"
    folder.mkdir()
    for item in Path(tiny_policy_path).iterdir():
        if item.name not in TOKENIZER_FILES and item.suffix != ".jinja":
            (folder / item.name).symlink_to(item)
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(str(folder))
    message = str(err.value)
    assert str(folder) in message and "tokenizer.json" in message and "--model_name_or_path" in message
    assert "save_pretrained" in message
    assert len(load_tokenizer(tiny_policy_path)) > 100  # a folder that has one loads as before


def test_prm_input_opens_with_no_bos_the_tokenizer_does_not_add(tiny_policy_path):
    """A tokenizer that declares a BOS but never adds it (SmolLM2's is ChatML's `<|im_start|>`): the
    PRM's input starts with the prompt's own tokens, as the policy saw them."""
    tok = load_tokenizer(tiny_policy_path)
    tok.add_special_tokens({"bos_token": "<|im_start|>"})
    assert tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id
    record = {"prompt": "Mia has 7 pens.\n", "completions": ["7+5=12"], "labels": [True]}
    row = tokenize_stepwise(record, tok, separator="\n")
    assert row["input_ids"][: len(tok(record["prompt"])["input_ids"])] == tok(record["prompt"])["input_ids"]
    assert tok.bos_token_id not in row["input_ids"]


def test_recipe_dtype_is_float32_on_a_cpu_without_native_bf16(tmp_path, monkeypatch):
    """A GPU recipe's `dtype: bfloat16` would train emulated bf16 weights (several times slower);
    the command line's `--dtype` is still the user's word."""
    from treetune.trainers import common
    from treetune.trainers.step_dpo.config import StepDPOConfig, StepDPOScriptArguments
    from trl import ModelConfig

    recipe = tmp_path / "gpu.yaml"
    recipe.write_text("dtype: bfloat16\nbf16: true\n")
    types = (StepDPOScriptArguments, StepDPOConfig, ModelConfig)
    base = ["--config", str(recipe), "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(common, "_cuda", lambda: False)
    monkeypatch.setattr(common, "native_bf16", lambda: False)
    _, config, model = common.parse_recipe(types, base)
    assert model.dtype == "float32" and not config.bf16
    _, _, model = common.parse_recipe(types, base + ["--dtype", "bfloat16"])
    assert model.dtype == "bfloat16"
    monkeypatch.setattr(common, "native_bf16", lambda: True)  # native: the recipe's weights dtype stands
    assert common.parse_recipe(types, base)[2].dtype == "bfloat16"


def test_main_job_asks_an_instruct_model_in_its_chat_template(tmp_path, tiny_policy_path):
    from treetune.launch.main import MainArgs, Pipeline, STAGE_FUNCTIONS

    def style(**fields) -> str:
        return STAGE_FUNCTIONS["policy"](Pipeline(MainArgs(output_dir=str(tmp_path), **fields)))["prompt_style"]

    assert style() == "bare"  # the arith tiny policy, as it was trained
    assert style(model_name_or_path=tiny_policy_path) == "chat"  # a model given: its chat template
    assert style(model_name_or_path=tiny_policy_path, prompt_style="plain") == "plain"


def test_main_job_without_pairs_says_what_to_change(tmp_path):
    from treetune.launch.main import MainArgs, Pipeline, STAGE_FUNCTIONS

    pipeline = Pipeline(MainArgs(output_dir=str(tmp_path)))
    pipeline.state = {"policy": {"model": "m", "prompt_style": "chat"},
                      "pairs": {"pairs": 0, "why_no_pairs": {"no branching node with a value gap": 2}}}
    with pytest.raises(RuntimeError, match="no Step-DPO pairs .*no branching node.*--pair_margin"):
        STAGE_FUNCTIONS["step_dpo"](pipeline)


def test_step_dpo_on_an_empty_pair_file_says_so(tmp_path):
    """Not "no step pair fits max_length; raise --max_length", which sent the user after the wrong knob."""
    from treetune.trainers.step_dpo.trainer import main

    empty = tmp_path / "pairs.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"{empty}: no step pairs to train on"):
        main(["--pairs", str(empty), "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
