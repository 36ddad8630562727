"""The SFT recipe: deterministic from scratch, and fine-tuning an existing checkpoint on real data."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_sft(*args: str) -> None:
    command = [sys.executable, str(ROOT / "launch" / "sft.py"), *args, "--disable_tqdm", "true"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]


def _weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_from_scratch_build_is_deterministic(tmp_path):
    small = ["--config", str(ROOT / "configs" / "arith" / "policy.yaml"), "--num_train_examples", "256",
             "--per_device_train_batch_size", "32", "--num_hidden_layers", "1"]
    _run_sft(*small, "--output_dir", str(tmp_path / "a"))
    _run_sft(*small, "--output_dir", str(tmp_path / "b"))
    assert _weights_digest(tmp_path / "a") == _weights_digest(tmp_path / "b")
    metrics = json.loads((tmp_path / "a" / "train_metrics.json").read_text())
    assert metrics["num_records"] == 256 and metrics["train_loss"] > 0


def test_fine_tunes_an_existing_checkpoint_on_gsm8k(tmp_path, tiny_policy_path, shared_data):
    # The same recipe given a model path (a hub name works the same way) and a real data set.
    out = tmp_path / "ft"
    _run_sft("--model_name_or_path", tiny_policy_path, "--dataset_source", "gsm8k",
             "--dataset_path", str(shared_data / "gsm8k" / "train.jsonl"), "--num_train_examples", "16",
             "--prompt_style", "plain", "--max_steps", "2", "--per_device_train_batch_size", "8",
             "--max_length", "256", "--report_to", "none", "--output_dir", str(out))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(tiny_policy_path)
    changed = any((a - b).abs().max() > 0 for a, b in zip(model.parameters(), before.parameters()))
    assert changed
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["script"]["dataset_source"] == "gsm8k"


def test_bad_training_file_names_line_and_field(tmp_path):
    bad = tmp_path / "records.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    command = [sys.executable, str(ROOT / "launch" / "sft.py"), "--config", str(ROOT / "configs" / "arith" / "policy.yaml"),
               "--dataset_source", "records", "--dataset_path", str(bad), "--output_dir", str(tmp_path / "o")]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode != 0
    assert f"{bad}:2: field 'completion': missing" in completed.stderr
