"""ThinkPRM: prompt, chain-label parsing, Yes/No scoring, data filtering, and the scorer end to end
over a real engine (the tiny policy with a widened context, read through HFEngine)."""

from __future__ import annotations

import math

import pytest
import torch
from treetune.data import load_problems
from treetune.rewards.labels.think_prm import (
    VerificationExample,
    arith_example,
    arith_template_chain,
    balance,
    chain_matches,
    filter_chains,
    to_records,
    trim_chain,
    widen_context,
)
from treetune.rewards.scorers.think_prm import (
    ThinkPRM,
    Verification,
    chain_complete,
    decision_suffix,
    decision_tokens,
    parse_step_labels,
    render_prompt,
    solution_lines,
    training_completion,
    yes_probability,
)

CHAIN_OK = ("\nStep 1: 3+4 is 7, as written. The step is \\boxed{correct}"
            "\nStep 2: 7-2 is 5, as written. The step is \\boxed{correct}"
            "\nStep 3: the answer 5 is the total. The step is \\boxed{correct}")
CHAIN_BAD = ("\nStep 1: 3+4 is 7, as written. The step is \\boxed{correct}"
             "\nStep 2: 7-2 is 5, not 6. The step is \\boxed{incorrect}")


def test_solution_lines_strip_existing_step_markers():
    assert solution_lines(["Step 1: a=1", "## Step 2: b", "c"]) == "Step 1: a=1\nStep 2: b\nStep 3: c"
    prompt = render_prompt("What is 3+4-2?", ["3+4=7", "7-2=5"])
    assert "[Math Problem]\n\nWhat is 3+4-2?" in prompt and "Step 2: 7-2=5" in prompt
    assert prompt.endswith("<think>\nLet's verify step by step:")


def test_label_parsing_pads_missing_steps_as_incorrect():
    assert parse_step_labels(CHAIN_OK, 3) == [1, 1, 1]
    assert parse_step_labels(CHAIN_BAD, 4) == [1, 0, 0, 0]
    assert parse_step_labels(CHAIN_OK, 2) == [1, 1]  # verdicts past the solution are ignored
    assert parse_step_labels("no verdicts here", 2) == [0, 0]
    assert parse_step_labels("\\boxed{ correct } then \\boxed{7} then \\boxed{incorrect}", 3) == [1, 0, 0]
    assert chain_complete(CHAIN_OK, 3) and chain_complete(CHAIN_BAD, 4)
    assert not chain_complete(CHAIN_OK.rsplit("\nStep 3", 1)[0], 3)  # stopped while all was right
    assert not chain_complete("", 1)


def test_yes_probability_from_top_logprobs():
    assert yes_probability({5: math.log(0.6), 9: math.log(0.2), 1: math.log(0.2)}, 5, 9) == pytest.approx(0.75)
    assert yes_probability({5: -0.1}, 5, 9) == 1.0
    assert yes_probability({9: -0.1}, 5, 9) == 0.0
    assert yes_probability({3: -0.1}, 5, 9) == 0.0  # neither answer: invalid, a rejection
    assert yes_probability(None, 5, 9) == 0.0
    assert yes_probability({5: -1000.0, 9: -1000.5}, 5, 9) == pytest.approx(1 / (1 + math.exp(-0.5)))


def test_step_readouts():
    v = Verification(chains=["a", "b"], labels=[[1, 1, 1], [1, 0, 0]], yes=[0.9, 0.3])
    assert v.step_scores("labels") == [1.0, 0.5, 0.5]
    assert v.step_scores("hybrid") == [1.0, 0.5, pytest.approx(0.6)]
    with pytest.raises(ValueError):
        v.step_scores("nope")


@pytest.fixture(scope="module")
def tokenizer(tiny_policy_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_policy_path)


def test_decision_tokens_are_where_the_answers_part(tokenizer):
    context = render_prompt("Q", ["1+1=2"]) + decision_suffix(CHAIN_OK)
    ids, yes_id, no_id = decision_tokens(tokenizer, context)
    full_yes = tokenizer(context + " Yes", add_special_tokens=False)["input_ids"]
    full_no = tokenizer(context + " No", add_special_tokens=False)["input_ids"]
    assert full_yes[:len(ids)] == ids == full_no[:len(ids)]
    assert full_yes[len(ids)] == yes_id != no_id == full_no[len(ids)]
    # the training target ends with exactly that text
    assert training_completion(CHAIN_OK, True).endswith("</think>\nIs the solution correct? Yes")


def test_template_chains_agree_with_the_checker():
    problem = load_problems("arith", "train", limit=1)[0]
    gold = problem.solution.split("\n")
    example = arith_example(problem, gold)
    example.chain = arith_template_chain(problem, gold)
    assert example.correct and chain_matches(example.chain, example)
    assert parse_step_labels(example.chain, len(gold)) == [1] * len(gold)
    wrong = list(gold)
    wrong[1] = wrong[1].split("=")[0] + "=" + str(int(wrong[1].split("=")[1]) + 1)
    bad = arith_example(problem, wrong)
    bad.chain = arith_template_chain(problem, wrong)
    assert bad.first_error == 1 and bad.gold_labels() == [1, 0]
    assert parse_step_labels(bad.chain, len(wrong)) == [1, 0] + [0] * (len(wrong) - 2)
    assert chain_matches(bad.chain, bad)
    # a chain that misses the error does not pass the process filter
    assert not chain_matches(example.chain.replace("Step 1", "Step 1"), bad)
    assert arith_example(problem, gold[:-1]) is None  # stopped before the answer: ambiguous, left out


def test_filter_and_balance():
    good = VerificationExample("a", "q", ["s1", "s2"], -1, "\\boxed{correct} \\boxed{correct}")
    bad = VerificationExample("b", "q", ["s1", "s2"], 0, "\\boxed{incorrect}")
    mismatch = VerificationExample("c", "q", ["s1", "s2"], 1, "\\boxed{correct} \\boxed{correct}")
    incomplete = VerificationExample("d", "q", ["s1", "s2"], -1, "\\boxed{correct}")
    kept, report = filter_chains([good, good, good, bad, mismatch, incomplete], balanced=True)
    assert report.passed == 4 and report.label_mismatch == 1 and report.incomplete == 1
    assert len(kept) == 2 and sum(e.correct for e in kept) == 1
    assert len(balance([good] * 5 + [bad] * 2)) == 4
    assert trim_chain("\\boxed{correct} ok \\boxed{incorrect} trailing talk", 3) == "\\boxed{correct} ok \\boxed{incorrect}"
    record = to_records([bad])[0]
    assert record["completion"].endswith("Is the solution correct? No") and record["prompt"].endswith("step by step:")


@pytest.fixture(scope="module")
def verifier_model(tiny_policy_path, tmp_path_factory):
    return str(widen_context(tiny_policy_path, tmp_path_factory.mktemp("think") / "init", 1024))


def test_hf_engine_top_logprobs_match_the_model(verifier_model, tokenizer):
    from transformers import AutoModelForCausalLM
    from treetune.rollouts.engines import GenerationRequest, HFEngine, SamplingSettings

    engine = HFEngine(verifier_model)
    ids = tokenizer("Mia has 7 pens. She gets 5 more. How many pens does Mia have now?\n")["input_ids"]
    c = engine.generate([GenerationRequest(ids, SamplingSettings(temperature=1.0, max_tokens=2, seed=0, top_logprobs=5))])[0].completions[0]
    assert len(c.top_logprobs) == len(c.token_ids) and all(len(t) == 5 for t in c.top_logprobs)
    model = AutoModelForCausalLM.from_pretrained(verifier_model).eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    best = torch.topk(expected, 5)
    assert set(c.top_logprobs[0]) == set(best.indices.tolist())
    for t, v in zip(best.indices.tolist(), best.values.tolist()):
        assert c.top_logprobs[0][t] == pytest.approx(v, abs=1e-4)


def test_think_prm_scores_through_an_engine(verifier_model):
    from treetune.rollouts.engines import HFEngine

    engine = HFEngine(verifier_model)
    prm = ThinkPRM(engine=engine, chains=2, temperature=1.0, max_chain_tokens=24, seed=0)
    problem = load_problems("arith", "test", limit=1)[0]
    steps = problem.solution.split("\n")
    verified = prm.verify([problem.question, problem.question], [steps, steps[:1]])
    assert [len(v.chains) for v in verified] == [2, 2]
    for v, n in zip(verified, (len(steps), 1)):
        assert all(len(labels) == n for labels in v.labels)
        assert all(0.0 <= y <= 1.0 for y in v.yes)
        # the stop pattern: a chain never reaches the step after the last one given
        assert all(f"Step {n + 1}:" not in chain for chain in v.chains)
    scores = prm.score([problem.question, problem.question], [steps, []])
    assert len(scores[0]) == len(steps) and scores[1] == []
    assert all(0.0 <= s <= 1.0 for s in scores[0])


def test_compact_style_and_saved_format(tmp_path):
    import json

    from treetune.rewards.scorers.think_prm import saved_format

    compact = render_prompt("What is 3+4?", ["3+4=7"], style="compact")
    assert compact == "[Math Problem]\nWhat is 3+4?\n[Solution]\nStep 1: 3+4=7\n<think>\nLet's verify step by step:"
    with pytest.raises(ValueError):
        render_prompt("q", ["s"], style="nope")
    init, tuned = tmp_path / "init", tmp_path / "tuned"
    init.mkdir(), tuned.mkdir()
    (init / "think_prm.json").write_text(json.dumps({"prompt_style": "compact", "chat": False}))
    (tuned / "recipe.json").write_text(json.dumps({"script": {"model_name_or_path": str(init)}}))
    assert saved_format(str(tuned))["prompt_style"] == "compact"
    assert saved_format(str(tmp_path)) == {}
