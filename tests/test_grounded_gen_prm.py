"""The generative GroundedPRM scorer: prompts identical to the training records, the verdict read
at `\\boxed{`, and the turn-by-turn scorer over a real engine."""

from __future__ import annotations

import math

import pytest
import torch
from treetune.data import load_problems
from treetune.rewards.labels.grounded import SYSTEM_PROMPT, GroundedPath, rationale, rationale_records
from treetune.rewards.labels.think_prm import widen_context
from treetune.rewards.scorers.grounded_gen import BOXED, GroundedGenPRM, render, user_turn, verdict_tokens


@pytest.fixture(scope="module")
def tokenizer(tiny_policy_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy_path)


@pytest.mark.parametrize("with_template", [True, False])
def test_scorer_prompts_are_the_training_prompts(tokenizer, with_template):
    tok = tokenizer if with_template else None
    path = GroundedPath("p", "Mia has 7 pens. She gets 5 more. How many pens does Mia have now?",
                        ["7+5=12", "The answer is \\boxed{12}"], [1.0, 1.0], [1, 1], [{}, {}], [True, True], True)
    records = rationale_records([path], tok)
    chat = [{"role": "system", "content": SYSTEM_PROMPT}]
    for i, step in enumerate(path.steps):
        chat.append({"role": "user", "content": user_turn(path.question, i, step)})
        assert render(chat, tok) == records[i]["prompt"]
        chat.append({"role": "assistant", "content": records[i]["completion"]})
    # a record's completion ends in the verdict the scorer reads: "\boxed{" then + or -
    assert records[0]["completion"].split(BOXED)[-1].startswith("+}")
    assert rationale({}, False).split(BOXED)[-1].startswith("-}")


def test_verdict_tokens(tokenizer):
    context = "<output>\nSo this step is: " + BOXED
    ids, plus_id, minus_id = verdict_tokens(tokenizer, context)
    assert plus_id != minus_id
    assert tokenizer(context + "+}", add_special_tokens=False)["input_ids"][:len(ids) + 1] == ids + [plus_id]
    assert tokenizer(context + "-}", add_special_tokens=False)["input_ids"][:len(ids) + 1] == ids + [minus_id]


def test_scores_turn_by_turn_through_an_engine(tiny_policy_path, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM
    from treetune.rollouts.engines import HFEngine

    model_dir = str(widen_context(tiny_policy_path, tmp_path / "init", 1024))
    engine = HFEngine(model_dir)
    prm = GroundedGenPRM(engine=engine, max_rationale_tokens=8)
    problem = load_problems("arith", "test", limit=1)[0]
    steps = problem.solution.split("\n")
    scores = prm.score([problem.question, problem.question], [steps[:2], steps[:1]])
    assert [len(s) for s in scores] == [2, 1]
    assert all(0.0 <= v <= 1.0 for s in scores for v in s)
    # the first step of both solutions sees the same prompt, so the greedy verifier scores it alike
    assert scores[0][0] == pytest.approx(scores[1][0])
    # and that score is the model's own P(+) / (P(+) + P(-)) after the rationale it wrote
    chat = [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_turn(problem.question, 0, steps[0])}]
    prompt = render(chat, tokenizer)
    from treetune.rollouts.engines import GenerationRequest, SamplingSettings

    written = engine.generate([GenerationRequest(tokenizer(prompt, add_special_tokens=False)["input_ids"],
                                                 SamplingSettings(temperature=0.0, max_tokens=8, stop=(BOXED,),
                                                                  include_stop=True, logprobs=False))])[0].completions[0].text
    if not written.endswith(BOXED):
        written = written.rstrip() + ("\n" if written.strip() else "") + "<output>\nSo this step is: " + BOXED
    ids, plus_id, minus_id = verdict_tokens(tokenizer, prompt + written)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    top = set(torch.topk(logits, 20).indices.tolist())
    if plus_id in top or minus_id in top:
        lp = torch.log_softmax(logits, -1)
        p = lp[plus_id].exp() if plus_id in top else 0.0
        m = lp[minus_id].exp() if minus_id in top else 0.0
        assert scores[0][0] == pytest.approx(float(p / (p + m)), abs=1e-3)
    else:
        assert scores[0][0] == 0.5
    assert not math.isnan(scores[0][1])
