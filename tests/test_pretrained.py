"""The real-model ground: SmolLM2-135M-Instruct converted from the shipped GGUF, Qwen's real tokenizer,
random-weight Qwen models, and the errors a user gets when a file is missing or broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from treetune.data.pretrained import qwen_tokenizer, qwen_tokenizer_path, random_qwen, smollm2, smollm2_gguf


def test_qwen_tokenizer_is_the_real_one():
    tokenizer = qwen_tokenizer()
    assert len(tokenizer) == 151_669  # 151,643 BPE tokens + 26 added ones
    assert tokenizer.convert_tokens_to_ids("<think>") == 151_667
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # real BPE: a blank-line separator is a token of its own after a digit, but merges with a full stop
    pieces = lambda text: [tokenizer.decode([i]) for i in tokenizer(text)["input_ids"]]  # noqa: E731
    assert pieces("12\n\n3") == ["1", "2", "\n\n", "3"]
    assert pieces("Step 1.\n\nStep 2") == ["Step", " ", "1", ".\n\n", "Step", " ", "2"]


def test_qwen_tokenizer_takes_extra_tokens():
    tokenizer = qwen_tokenizer(("<extra_0>",))
    assert tokenizer.tokenize("a<extra_0>b") == ["a", "<extra_0>", "b"]
    assert (Path(qwen_tokenizer_path()) / "tokenizer.json").exists()


def test_random_qwen_checks_its_size(tmp_path):
    with pytest.raises(ValueError, match="head_dim >= 32"):
        random_qwen(hidden_size=64, num_heads=4, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="qwen2 or qwen3"):
        random_qwen(arch="llama", cache_dir=tmp_path)


@pytest.mark.slow
def test_random_qwen3_loads_with_its_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    path = random_qwen("qwen3", hidden_size=64, num_heads=2, extra_tokens=("<extra_0>",), cache_dir=tmp_path)
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config.model_type == "qwen3" and config.head_dim == 32
    assert config.vocab_size == len(tokenizer) == 151_670
    assert random_qwen("qwen3", hidden_size=64, num_heads=2, extra_tokens=("<extra_0>",), cache_dir=tmp_path) == path


def test_missing_and_broken_gguf_are_named(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        smollm2(cache_dir=tmp_path, gguf_path=missing)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match="broken.gguf is not a readable GGUF"):
        smollm2(cache_dir=tmp_path / "cache", gguf_path=broken)
    assert not any((tmp_path / "cache").glob("smollm2-*/config.json"))  # nothing half-built left as done


@pytest.mark.slow
def test_smollm2_is_a_real_instruct_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert smollm2_gguf().stat().st_size > 50_000_000
    path = Path(smollm2())
    source = json.loads((path / "treetune_source.json").read_text())
    assert source["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and len(tokenizer) == 49_152
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "12" in answer  # a pretrained model, not random weights
