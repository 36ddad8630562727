"""The arith tiny policy: built once by the SFT recipe, cached, and loadable by vLLM on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from treetune.data import PromptTemplate
from treetune.data.arith import arith_problems, check_solution
from treetune.rollouts.engines import GenerationRequest, SamplingSettings


def test_policy_is_a_small_qwen2_vllm_can_run(tiny_policy_path):
    config = json.loads((Path(tiny_policy_path) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["head_dim"] >= 32
    assert (Path(tiny_policy_path) / "tokenizer.json").exists()


def test_cached_policy_is_reused(tiny_policy_path):
    from treetune.data.arith import tiny_policy

    assert tiny_policy() == tiny_policy_path


def test_tokenizer_splits_digits(tiny_policy_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_path)
    ids = tokenizer("12+30=42", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids] == list("12+30=42")
    problem = arith_problems("test", 1)[0]
    text = problem.question + "\n" + problem.solution
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.slow
def test_vllm_generates_solutions(engine):
    problems = arith_problems("validation", 40)
    template = PromptTemplate(style="bare")
    requests = [GenerationRequest(template.render_ids(p.question, engine.tokenizer),
                                  SamplingSettings(temperature=0.0, max_tokens=128)) for p in problems]
    results = engine.generate(requests)
    assert len(results) == 40
    for result in results:
        completion = result.completions[0]
        assert completion.token_ids and len(completion.logprobs) == len(completion.token_ids)
        assert completion.finish_reason in ("stop", "length")
    # The policy writes solutions in the task's format and solves some problems outright.
    verdicts = [check_solution(p, r.completions[0].text) for p, r in zip(problems, results)]
    assert sum(v == -1 for v in verdicts) >= 5
    assert all("=" in r.completions[0].text for r in results)


@pytest.mark.slow
def test_sampling_honours_seeds(engine):
    problem = arith_problems("validation", 1)[0]
    prompt = PromptTemplate(style="bare").render_ids(problem.question, engine.tokenizer)
    settings = SamplingSettings(n=4, temperature=1.0, max_tokens=64, seed=123)
    first = engine.generate([GenerationRequest(prompt, settings)])[0]
    second = engine.generate([GenerationRequest(prompt, settings)])[0]
    assert [c.token_ids for c in first.completions] == [c.token_ids for c in second.completions]
    assert all(lp <= 0.0 for c in first.completions for lp in c.logprobs)
