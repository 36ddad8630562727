"""HFEngine: the engine contract on transformers.generate, checked against the model itself."""

from __future__ import annotations

import pytest
import torch
from treetune.data import PromptTemplate
from treetune.data.arith import arith_problems, check_solution
from treetune.rollouts.engines import GenerationRequest, SamplingSettings


@pytest.fixture(scope="module")
def engine(tiny_policy_path):
    from treetune.rollouts.engines import HFEngine

    return HFEngine(tiny_policy_path)


def _prompt(engine, index=0):
    problem = arith_problems("validation", index + 1)[index]
    return problem, PromptTemplate(style="bare").render_ids(problem.question, engine.tokenizer)


def test_greedy_solutions_and_finish_reasons(engine):
    problems = arith_problems("validation", 16)
    template = PromptTemplate(style="bare")
    results = engine.generate([GenerationRequest(template.render_ids(p.question, engine.tokenizer),
                                                 SamplingSettings(temperature=0.0, max_tokens=96)) for p in problems])
    solved = sum(check_solution(p, r.completions[0].text) == -1 for p, r in zip(problems, results))
    assert solved >= 2
    for r in results:
        c = r.completions[0]
        assert c.finish_reason == "stop" and c.token_ids[-1] == engine.tokenizer.eos_token_id
        assert len(c.logprobs) == len(c.token_ids)
    short = engine.generate([GenerationRequest(_prompt(engine)[1], SamplingSettings(temperature=0.0, max_tokens=3))])[0].completions[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3


def test_logprobs_are_the_processed_ones(engine):
    _, prompt = _prompt(engine)
    temperature = 0.5
    result = engine.generate([GenerationRequest(prompt, SamplingSettings(n=3, temperature=temperature, max_tokens=4, seed=7))])[0]
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt])).logits[0, -1].float()
    expected = torch.log_softmax(logits / temperature, dim=-1)
    for c in result.completions:
        assert c.logprobs[0] == pytest.approx(float(expected[c.token_ids[0]]), abs=1e-4)


def test_seeds_and_stop_strings(engine):
    _, prompt = _prompt(engine)
    settings = SamplingSettings(n=4, temperature=1.0, max_tokens=40, seed=11)
    first = engine.generate([GenerationRequest(prompt, settings)])[0]
    second = engine.generate([GenerationRequest(prompt, settings)])[0]
    assert [c.token_ids for c in first.completions] == [c.token_ids for c in second.completions]
    stopped = engine.generate([GenerationRequest(prompt, SamplingSettings(temperature=0.0, max_tokens=60, stop=["\n"]))])[0]
    completion = stopped.completions[0]
    assert completion.finish_reason == "stop" and "\n" not in completion.text and completion.text
