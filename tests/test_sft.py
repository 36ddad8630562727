"""The SFT recipe: deterministic from scratch, and fine-tuning an existing checkpoint on real data."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_sft(*args: str) -> None:
    command = [sys.executable, str(ROOT / "launch" / "sft.py"), *args, "--disable_tqdm", "true"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]


def _weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_from_scratch_build_is_deterministic(tmp_path):
    small = ["--config", str(ROOT / "configs" / "sft" / "arith.yaml"), "--limit", "256",
             "--per_device_train_batch_size", "32", "--num_hidden_layers", "1"]
    _run_sft(*small, "--output_dir", str(tmp_path / "a"))
    _run_sft(*small, "--output_dir", str(tmp_path / "b"))
    assert _weights_digest(tmp_path / "a") == _weights_digest(tmp_path / "b")
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["num_records"] == 256 and metrics["train_loss"] > 0
    recipe = json.loads((tmp_path / "a" / "recipe.json").read_text())  # the resolved recipe, flat
    assert recipe["source"] == "arith" and recipe["limit"] == 256 and recipe["num_hidden_layers"] == 1


@pytest.mark.slow
def test_fine_tunes_an_existing_checkpoint_on_gsm8k(tmp_path, tiny_policy_path, shared_data):
    # The same recipe given a model path (a hub name works the same way) and a real data set.
    out = tmp_path / "ft"
    _run_sft("--model_name_or_path", tiny_policy_path, "--source", "gsm8k",
             "--data_path", str(shared_data / "gsm8k" / "train.jsonl"), "--limit", "16",
             "--prompt_style", "plain", "--max_steps", "2", "--per_device_train_batch_size", "8",
             "--max_length", "256", "--report_to", "none", "--output_dir", str(out))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(tiny_policy_path)
    changed = any((a - b).abs().max() > 0 for a, b in zip(model.parameters(), before.parameters()))
    assert changed
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["source"] == "gsm8k" and recipe["model_name_or_path"] == tiny_policy_path


@pytest.mark.slow
def test_bad_training_file_names_line_and_field(tmp_path):
    bad = tmp_path / "records.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    command = [sys.executable, str(ROOT / "launch" / "sft.py"), "--config", str(ROOT / "configs" / "sft" / "arith.yaml"),
               "--source", "records", "--data_path", str(bad), "--output_dir", str(tmp_path / "o")]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode != 0
    assert f"{bad}:2: field 'completion': missing" in completed.stderr


def test_old_problem_field_names_still_work_with_a_warning(tmp_path):
    """The names before the shared problem vocabulary, on the command line and in a recipe file."""
    from treetune.trainers.common import parse_recipe
    from treetune.trainers.sft.config import RENAMED, SFTScriptArguments
    from trl import ModelConfig, SFTConfig

    old = tmp_path / "old.yaml"
    old.write_text("dataset_source: records\ndataset_path: r.jsonl\nnum_train_examples: 7\n")
    with pytest.warns(FutureWarning, match="dataset_source"):
        script, _, _ = parse_recipe((SFTScriptArguments, SFTConfig, ModelConfig),
                                    ["--config", str(old), "--data_seed_offset", "3", "--output_dir", str(tmp_path)], RENAMED)
    assert (script.source, script.data_path, script.limit, script.problem_seed) == ("records", "r.jsonl", 7, 3)
    assert script.split == "train"  # SFT's default, not the evaluation jobs' test split


def test_policy_cache_keys_survive_the_renamed_fields():
    """A tiny policy built from a recipe written with the old field names keeps its cache key."""
    import yaml

    from treetune.data.arith.policies import DUAL_MODE_RECIPE, KEY_NAMES, RECIPE, recipe_digest, recipe_path
    from treetune.trainers.sft.config import RENAMED

    assert KEY_NAMES == {new: old for old, new in RENAMED.items()}
    for name in (RECIPE, DUAL_MODE_RECIPE):
        text = recipe_path(name).read_text()
        recipe = yaml.safe_load(text)
        assert set(recipe) & set(KEY_NAMES), name  # the recipe uses the new names ...
        old = yaml.safe_dump({KEY_NAMES.get(k, k): v for k, v in recipe.items()})
        assert recipe_digest(old) == recipe_digest(text)  # ... and hashes as the old one did
