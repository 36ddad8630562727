"""ThinkPRM: prompt, chain-label parsing, Yes/No scoring, data filtering, the scorer end to end
over a real engine (the tiny policy with a widened context, read through HFEngine), and the data
run's steps (solutions -> labelled examples -> chains -> records) and the whole data job."""

from __future__ import annotations

import json
import math

import pytest
import torch
from treetune.data import load_problems
from treetune.data.arith import check_solution
from treetune.rewards.labels.think_prm import (
    VerificationExample,
    arith_example,
    arith_template_chain,
    balance,
    build_records,
    cap_records,
    chain_matches,
    data_metrics,
    examples_from_trees,
    filter_chains,
    sample_examples,
    template_chains,
    to_records,
    trim_chain,
    verifier_chains,
    verifier_init,
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
from treetune.rollouts.engines import HFEngine
from treetune.rollouts.tree import ReasoningTree

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

    engine = HFEngine(verifier_model, dtype="float32")  # the reference below runs in float32 too
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


# -- the data run's steps -------------------------------------------------------------------------

def arith_tree(problem, texts) -> ReasoningTree:
    """A flat tree of finished solutions `texts` to an arith problem, as the sampler stores it."""
    tree = ReasoningTree(problem_id=problem.id, prompt=problem.question + "\n", prompt_ids=[1], answer=problem.answer,
                         problem={"question": problem.question, "source": "arith", **problem.extra})
    for text in texts:
        tree.add(0, text, [1], [-0.1], "eos")
    return tree


@pytest.fixture(scope="module")
def two_problems():
    return load_problems("arith", "train", limit=2)


@pytest.fixture(scope="module")
def examples(two_problems):
    first, second = two_problems
    gold = first.solution  # 7+6=13 / 13+6=19 / 19-3=16 / The answer is \boxed{16}
    assert gold.split("\n")[1] == "13+6=19"
    wrong = gold.replace("13+6=19", "13+6=18")  # the second step is wrong
    stopped = "\n".join(gold.split("\n")[:2])  # right so far, but stops before its answer
    trees = [arith_tree(first, [gold, wrong, gold + "\n", stopped, ""]),
             arith_tree(second, [second.solution.replace("5+7=12", "5+7=13", 1)])]  # the first step is wrong
    return examples_from_trees(trees, two_problems)


def test_examples_are_the_distinct_finished_solutions_with_the_checkers_labels(examples, two_problems):
    first, second = two_problems
    # the repeated solution counts once; the one that stops early and the empty one are left out
    assert [(e.problem_id, e.first_error) for e in examples] == [(first.id, -1), (first.id, 1), (second.id, 0)]
    assert examples[0].steps == first.solution.split("\n") and examples[1].steps[1] == "13+6=18"
    assert [e.gold_labels() for e in examples] == [[1, 1, 1, 1], [1, 0], [0]]
    assert all(e.question == (first if e.problem_id == first.id else second).question for e in examples)


def test_template_chains_pass_the_filter_and_become_records(examples, two_problems):
    by_id = {p.id: p for p in two_problems}
    candidates = template_chains(examples, two_problems)
    assert [c.chain for c in candidates] == [arith_template_chain(by_id[e.problem_id], e.steps) for e in examples]
    # the checker's chain: every step judged right, or verdicts up to the first wrong step, which it calls wrong
    assert [parse_step_labels(c.chain, len(c.steps)) for c in candidates] == [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0, 0]]
    records, report = build_records(candidates, balanced=False)
    assert (report.candidates, report.passed, report.incomplete, report.label_mismatch) == (3, 3, 0, 0)
    assert [r["first_error"] for r in records] == [-1, 1, 0]
    assert [r["completion"].rsplit(" ", 1)[-1] for r in records] == ["Yes", "No", "No"]
    assert records[1]["prompt"].endswith("Let's verify step by step:") and "Step 2: 13+6=18" in records[1]["prompt"]
    # balanced: as many right as wrong solutions
    balanced, report = build_records(candidates, seed=0)
    assert report.kept_after_balance == 2 and sorted(r["first_error"] == -1 for r in balanced) == [False, True]
    # a chain that calls the wrong step right fails the process filter
    lying = VerificationExample(examples[1].problem_id, examples[1].question, examples[1].steps, 1, candidates[0].chain)
    kept, report = build_records([lying], balanced=False)
    assert kept == [] and report.label_mismatch == 1


def test_too_long_chains_are_dropped(examples, two_problems, tokenizer):
    candidates = template_chains(examples, two_problems)
    longest = max(len(tokenizer(c.chain, add_special_tokens=False)["input_ids"]) for c in candidates)
    shortest = min(len(tokenizer(c.chain, add_special_tokens=False)["input_ids"]) for c in candidates)
    assert shortest < longest
    records, report = build_records(candidates, tokenizer, max_chain_tokens=longest - 1, balanced=False)
    assert report.too_long >= 1 and report.passed == len(records) == 3 - report.too_long
    assert build_records(candidates, tokenizer, max_chain_tokens=longest, balanced=False)[1].too_long == 0


def test_cap_keeps_half_right_and_half_wrong_in_order():
    right = [VerificationExample(f"r{i}", "q", ["s"], -1) for i in range(5)]
    wrong = [VerificationExample(f"w{i}", "q", ["s"], 0) for i in range(3)]
    mixed = [right[0], wrong[0], right[1], right[2], wrong[1], right[3], wrong[2], right[4]]
    assert [e.problem_id for e in cap_records(mixed, 4)] == ["r0", "r1", "w0", "w1"]
    assert [e.problem_id for e in cap_records(mixed, 5)] == ["r0", "r1", "w0", "w1", "w2"]
    assert cap_records(mixed, None) == mixed and cap_records(mixed, 8) == mixed


def test_data_metrics_count_solutions_filter_and_record_lengths(examples, two_problems, tokenizer):
    records, report = build_records(template_chains(examples, two_problems), balanced=False)
    metrics = data_metrics(examples, report, records, tokenizer)
    lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in records]
    assert (metrics["solutions"], metrics["correct_solutions"], metrics["records"]) == (3, 1, 3)
    assert metrics["filter"]["passed"] == 3
    assert metrics["record_tokens_max"] == max(lengths) and metrics["record_tokens_mean"] == pytest.approx(sum(lengths) / 3)


def test_verifier_init_widens_the_context_and_carries_the_format(tiny_policy_path, tmp_path):
    from treetune.rewards.scorers.think_prm import saved_format

    init = verifier_init(tiny_policy_path, tmp_path / "init", 2048, "compact")
    assert json.loads((init / "config.json").read_text())["max_position_embeddings"] == 2048
    assert saved_format(str(init)) == {"prompt_style": "compact", "chat": False}


def test_verifier_chains_are_one_candidate_per_distinct_chain(verifier_model, examples):
    prm = ThinkPRM(engine=HFEngine(verifier_model), chains=4, temperature=1.0, max_chain_tokens=2, seed=0)
    verified = prm.verify([e.question for e in examples], [e.steps for e in examples])  # the same seeds as below
    distinct = [list(dict.fromkeys(v.chains)) for v in verified]
    assert sum(map(len, distinct)) < 4 * len(examples)  # two-token chains repeat: some chains come once only
    candidates = verifier_chains(examples, prm)
    assert [c.chain for c in candidates] == [chain for chains in distinct for chain in chains]
    owners = [e for e, chains in zip(examples, distinct) for _ in chains]
    assert [(c.problem_id, c.steps, c.first_error) for c in candidates] == [(e.problem_id, e.steps, e.first_error)
                                                                           for e in owners]


def test_sampled_examples_are_labelled_by_the_checker(tiny_policy_path):
    problems = load_problems("arith", "train", limit=3)
    examples = sample_examples(HFEngine(tiny_policy_path), problems, samples=3, max_tokens=80, seed=0)
    by_id = {p.id: p for p in problems}
    assert examples and {e.problem_id for e in examples} <= set(by_id)
    for e in examples:
        first = check_solution(by_id[e.problem_id], "\n".join(e.steps))
        assert e.first_error == first and first != len(e.steps)
    distinct = {(e.problem_id, tuple(e.steps)) for e in examples}
    assert len(distinct) == len(examples)


@pytest.mark.slow
def test_the_data_job_writes_records_the_sft_recipe_reads(tmp_path):
    from treetune.launch.think_prm_data import ThinkPRMDataArgs, run
    from treetune.rewards.scorers.think_prm import saved_format
    from treetune.trainers.sft.config import SFTScriptArguments
    from treetune.trainers.sft.trainer import training_records

    out = tmp_path / "data"
    metrics = run(ThinkPRMDataArgs(output_dir=str(out), limit=8, offset=2, samples=3, balance=False,
                                   prompt_style="compact"))
    records = [json.loads(line) for line in (out / "records.jsonl").open()]
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["records"] == len(records) > 0 and metrics["solutions"] >= len(records)
    assert metrics["filter"]["incomplete"] == metrics["filter"]["label_mismatch"] == 0  # the checker's own chains
    problems = {p.id: p for p in load_problems("arith", "train", limit=10)[2:]}
    for r in records:
        assert r["problem_id"] in problems
        assert r["first_error"] == check_solution(problems[r["problem_id"]], "\n".join(r["steps"]))
        assert r["completion"].endswith("Is the solution correct? " + ("Yes" if r["first_error"] == -1 else "No"))
    config = json.loads((out / "config.json").read_text())
    assert (config["limit"], config["offset"], config["split"], config["prompt_style"]) == (8, 2, "train", "compact")
    assert saved_format(metrics["init_model"])["prompt_style"] == "compact"
    rows = training_records(SFTScriptArguments(source="records", data_path=str(out / "records.jsonl")))
    assert rows == [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
