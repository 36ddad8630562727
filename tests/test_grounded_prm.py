"""GroundedPRM: the sandboxed tool (hostile input, equation finding, verdicts), the hybrid reward
and its backup on a hand-built tree, the agreement filter and the rationale records."""

from __future__ import annotations

import json

import pytest
from treetune.rewards.labels import grounded as gp
from treetune.rewards.sandbox.pool import SandboxPool
from treetune.rewards.scorers.tool import (
    CHECK_FN,
    StepTool,
    ToolStepScorer,
    extract_equations,
    final_answer,
    normalize_math,
)
from treetune.rollouts.tree import ReasoningTree


@pytest.fixture(scope="module")
def tool():
    with StepTool(workers=1, timeout=5.0) as t:
        yield t


@pytest.fixture(scope="module")
def grounded_tool():
    with StepTool(workers=1, timeout=5.0, grounding=True) as t:
        yield t


# -- the sandbox -----------------------------------------------------------------------------------

def test_hostile_expressions_are_refused_in_the_worker():
    with SandboxPool(size=1, timeout=10) as pool:
        for hostile in ["__import__('os').system('touch /tmp/owned')", "(1).__class__", "9**9**9**9", "1e999999",
                        "[1]*10**9", "lambda: 1"]:
            result = pool.call(CHECK_FN, [[hostile, "1"]])
            assert not result.ok and "refused" in result.error, (hostile, result)
        huge = "1+" * 5_000_000 + "1"  # a 10 MB expression
        result = pool.call(CHECK_FN, [[huge, "5000001"]])
        assert not result.ok and "refused" in result.error
        assert pool.call(CHECK_FN, [["2+2", "4"]]).value == {"values": ["4", "4"], "equal": [True]}


def test_a_power_that_slips_past_the_size_guard_times_out_and_the_pool_recovers():
    # With the digit cap lifted, (9**9999)**9999 is an integer of about 95 million digits: the
    # worker is still computing it when the deadline passes, gets killed and replaced.
    with SandboxPool(size=1, timeout=2) as pool:
        pool.call(CHECK_FN, [["1", "1"]], timeout=60)  # start-up (imports sympy) outside the bound
        result = pool.call(CHECK_FN, [["((9**9999)**9999)**9999", "1"], 10**12])
        assert not result.ok and result.error.startswith(("timed out", "worker died"))
        assert pool.call(CHECK_FN, [["6*7", "42"]], timeout=60).value["equal"] == [True]


def test_hostile_steps_come_back_unverifiable_from_the_tool(tool):
    steps = ["__import__('os').system('rm -rf /') = 0", "9**9**9**9 = 1", "9^{9^{9^{9}}} = 1",
             "1+" * 5_000_000 + "1 = 5000001", "2+2=4"]
    verdicts = [c.verdict for c in tool.check(["q"], [steps])[0]]
    assert verdicts == ["unverifiable"] * 4 + ["correct"]


# -- finding equations ---------------------------------------------------------------------------

@pytest.mark.parametrize("step, sides", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.", [["48/2", "24"]]),
    ("7+5=12", [["7+5", "12"]]),
    ("Step 2: 12-3=9.", [["12-3", "9"]]),
    ("Working 50 minutes, she earned 0.2 x 50 = $10.", [["0.2*50", "10"]]),
    ("The total is $1,200 + $300 = $1,500.", [["1200 +  300", "1500"]]),
    ("12 pages + 24 pages = 36 pages.", [["12 + 24", "36"]]),
    ("The price is 2 × 3 = 6 dollars and 12 ÷ 4 = 3", [["2 * 3", "6"], ["12 / 4", "3"]]),
    ("$\\frac{3}{4} \\cdot 8 = 6$", [["((3)/(4)) * 8", "6"]]),
    ("20% of the 50 pens: 20% * 50 = 10", [["(20/100) * 50", "10"]]),
    ("Drop 8 degrees = 2 - 8 = -6 degrees", [["2 - 8", "-6"]]),
    ("5-2=+2=7", [["5-2", "+2", "7"]]),
    ("x + 5 = 12, so x = 7", []),  # a variable cuts the left side off: nothing to compute
    ("2x + 3 = 7", []),
    ("so 12 = 12", []),
    ("3-9=", []),
    ("The answer is \\boxed{9}", []),
    ("<<__import__('os').system(1)=1>> and <<2*3=6>>", [["2*3", "6"]]),  # names never leave this process
])
def test_equations_are_found_in_annotations_and_prose(step, sides):
    assert [e.sides for e in extract_equations(step)] == sides


def test_normalisation_and_final_answers():
    assert normalize_math("1½ + ¾") == "(1+1/2) +(3/4)"
    assert final_answer("The answer is \\boxed{1,000}") == "1000"
    assert final_answer("#### 72") == "72"
    assert final_answer("So the answer is 5.") == "5"
    assert final_answer("\\boxed{x = 3}") is None
    assert final_answer("12-3=9") is None


# -- verdicts ------------------------------------------------------------------------------------

def test_verdicts_on_hand_written_steps(tool):
    steps = ["Natalia sold 48/2 = <<48/2=24>>24 clips.", "She sold 48+24 = <<48+24=73>>73 in all.",
             "Each costs 10/3 = 3.33 dollars.", "Each costs 10/3 = 3.4 dollars.", "Let me think about it.",
             "$\\sqrt{8} = 2\\sqrt{2}$ is not numeric here, but \\sqrt{16} = 4", "2^{10} = 1000"]
    checks = tool.check(["q"], [steps])[0]
    assert [c.verdict for c in checks] == ["correct", "incorrect", "correct", "incorrect", "unverifiable", "correct", "incorrect"]
    assert checks[1].checks[0].values == ["72", "73"]


def test_final_answer_steps_are_checked_against_the_step_before(tool):
    checks = tool.check(["q", "q", "q"], [["7+5=12", "The answer is \\boxed{12}"],
                                          ["7+5=12", "The answer is \\boxed{13}"],
                                          ["I add them up.", "The answer is \\boxed{13}"]])
    assert [c.verdict for c in checks[0]] == ["correct", "correct"]
    assert [c.verdict for c in checks[1]] == ["correct", "incorrect"]
    assert [c.verdict for c in checks[2]] == ["unverifiable", "unverifiable"]


def test_grounding_catches_numbers_copied_wrong(grounded_tool, tool):
    question = "Mia has 19 books. She gets 1 more. She buys 3 more. How many books does Mia have now?"
    steps = ["19+2=21", "21+3=24"]  # arithmetic right, but 2 is in neither the problem nor a step
    assert [c.verdict for c in tool.check([question], [steps])[0]] == ["correct", "correct"]
    grounded = grounded_tool.check([question], [steps])[0]
    assert [c.verdict for c in grounded] == ["incorrect", "correct"]  # 21 was stated, so step 2 is grounded
    assert "operand 2" in grounded[0].checks[0].note


def test_arith_checker_agrees_with_the_tool_on_gold_and_corrupted_solutions(grounded_tool):
    from treetune.data import load_problems
    from treetune.data.arith import check_solution

    problems = load_problems("arith", "test", limit=40)
    solutions, truth = [], []
    for i, p in enumerate(problems):
        steps = p.solution.split("\n")
        if i % 2:  # corrupt one result (the running value carries on from the wrong one)
            k = i % (len(steps) - 1)
            left, result = steps[k].split("=")
            steps[k] = f"{left}={int(result) + 1 + i % 3}"
        solutions.append(steps)
        truth.append(check_solution(p, "\n".join(steps)))
    checks = grounded_tool.check([p.question for p in problems], solutions)
    for steps, first, path in zip(solutions, truth, checks):
        predicted = next((i for i, c in enumerate(path) if c.verdict == "incorrect"), -1)
        assert predicted == first


def test_gsm8k_gold_annotations_pass_and_a_changed_result_is_caught(tool, shared_data):
    from treetune.data import load_problems
    from treetune.data.steps import split_steps

    problems = load_problems("gsm8k", "test", path=str(shared_data / "gsm8k" / "test.jsonl"), limit=40)
    gold = tool.check([p.question for p in problems], [split_steps(p.solution, "line") for p in problems])
    annotations = [c for path in gold for step in path for c in step.checks if c.equation.source == "annotation"]
    assert len(annotations) > 80 and all(c.ok for c in annotations)
    first = problems[0]  # Janet's ducks: 16 - 3 - 4 = <<16-3-4=9>>9 ...
    changed = first.solution.replace("<<16-3-4=9>>", "<<16-3-4=10>>")
    assert changed != first.solution
    path = tool.check([first.question], [split_steps(changed, "line")])[0]
    assert path[0].verdict == "incorrect"


def test_tool_step_scorer_scores_and_neutral_choice(tool):
    scorer = ToolStepScorer(tool)
    scores = scorer.score(["q", "q"], [["2+2=4", "Now think.", "The answer is \\boxed{4}"],
                                       ["2+2=5", "Now think.", "3+3=6"]])
    assert scores == [[1.0, 0.5, 0.5], [0.0, 0.0, 1.0]]  # unverifiable: neutral, or 0 once the path went wrong


# -- the hybrid reward and its backup --------------------------------------------------------------

def test_hybrid_reward_formula():
    assert gp.hybrid_reward([], 1) == 1.0 and gp.hybrid_reward([], -1) == -1.0
    assert gp.hybrid_reward([1], -1) == pytest.approx(1 - 1)
    # N = 3: V = (1*3/3 - 1*2/3 + 1*1/3) / 3 = 2/9, R = 2/9 - 1/3
    assert gp.hybrid_reward([1, -1, 1], -1) == pytest.approx(2 / 9 - 1 / 3)
    # earlier steps weigh more: a wrong first step costs more than a wrong last one
    assert gp.hybrid_reward([-1, 1, 1], 1) < gp.hybrid_reward([1, 1, -1], 1)
    with pytest.raises(ValueError):
        gp.hybrid_reward([1], 0)


QUESTION = "Mia has 2 apples. She gets 3 more. She gets 1 more. How many apples does Mia have now?"


def hand_built_tree() -> ReasoningTree:
    """root - A "2+3=5" - B "5+1=6" - D answer 6 (right)
                        - C "5+1=7" - E answer 7 (wrong)
                        - G "5+2=7" - H answer 7 (wrong; G's arithmetic is right)"""
    tree = ReasoningTree(problem_id="p", prompt=QUESTION + "\n", prompt_ids=[1], answer="6", problem={"question": QUESTION})
    a = tree.add(0, "2+3=5\n", [])
    b = tree.add(a.id, "5+1=6\n", [])
    tree.add(b.id, "The answer is \\boxed{6}", [], finish_reason="eos", outcome=1.0)
    c = tree.add(a.id, "5+1=7\n", [])
    tree.add(c.id, "The answer is \\boxed{7}", [], finish_reason="eos", outcome=0.0)
    g = tree.add(a.id, "5+2=7\n", [])
    tree.add(g.id, "The answer is \\boxed{7}", [], finish_reason="eos", outcome=0.0)
    return tree


def test_backup_on_a_hand_built_tree(tool):
    tree = hand_built_tree()
    gp.annotate([tree], tool, gamma=0.9)
    a, b, d, c, e, g, h = tree.nodes[1:]
    assert [n.scores["tool"] for n in (a, b, d, c, e, g, h)] == [1, 1, 1, -1, 1, 1, 1]
    assert [n.scores["verdict"] for n in (d, e, h)] == [1, -1, -1]  # the final answer's F joins the last step
    # own rewards R: leaves F; B, C, G have nothing between them and the answer, so R = F;
    # A sees three simulations: via B (v=[+1], F=+1) -> 2, via C (v=[-1], F=-1) -> -2, via G (v=[+1], F=-1) -> 0
    assert [n.scores["grounded_reward"] for n in (d, e, h, b, c, g)] == [1, -1, -1, 1, -1, -1]
    assert a.scores["grounded_reward"] == pytest.approx((2 - 2 + 0) / 3)
    assert b.scores["grounded"] == pytest.approx(1 + 0.9 * 1)
    assert c.scores["grounded"] == pytest.approx(-1 - 0.9)
    assert a.scores["grounded"] == pytest.approx(0 + 0.9 * (1.9 - 1.9 - 1.9))
    assert a.scores["grounded_visits"] == 7


def test_agreement_filter_keeps_paths_whose_value_signs_match_the_tool(tool):
    tree = hand_built_tree()
    # one more right path under A raises A's value above 0
    extra = tree.add(1, "5+1=6 apples\n", [])
    tree.add(extra.id, "The answer is \\boxed{6}", [], finish_reason="eos", outcome=1.0)
    gp.annotate([tree], tool)
    assert tree.nodes[1].scores["grounded"] > 0
    kept, total = gp.agreeing_paths(tree)
    assert total == 4
    # A-B-D and A-extra agree everywhere; A-C-E: C is wrong (value < 0, tool -1), kept with the
    # negative run; A-G-H: G's arithmetic is right (tool +1) but its value is negative: dropped
    assert sorted(tuple(p.steps[1:2]) for p in kept) == [("5+1=6",), ("5+1=6 apples",), ("5+1=7",)]
    wrong = next(p for p in kept if p.steps[1] == "5+1=7")
    assert wrong.labels == [True, False, False] and not wrong.outcome


def test_truncation_of_negative_paths():
    assert gp.truncate_labels([True, True]) == [True, True]
    assert gp.truncate_labels([True, False, False, True, False]) == [True, False, False]


def test_missing_outcome_is_a_clear_error(tool):
    tree = hand_built_tree()
    del tree.nodes[3].scores["outcome"]
    with pytest.raises(ValueError, match="no 'outcome' score"):
        gp.annotate([tree], tool)


def test_step_tree_merges_segments_into_steps():
    # A TreePO-like tree: segments cut steps in the middle; two paths share the first step.
    tree = ReasoningTree(problem_id="p", prompt="q\n", prompt_ids=[1], answer="6", problem={"question": QUESTION})
    s1 = tree.add(0, "2+3", [])
    s2 = tree.add(s1.id, "=5\n5+", [])
    tree.add(s2.id, "1=6\nThe answer is \\boxed{6}", [], finish_reason="boxed", outcome=1.0)
    tree.add(s2.id, "2=7\nThe answer is \\boxed{7}", [], finish_reason="boxed", outcome=0.0)
    steps = gp.to_step_tree(tree)
    assert [n.text for n in steps.nodes[1:]] == ["2+3=5\n", "5+1=6\n", "The answer is \\boxed{6}\n", "5+2=7\n",
                                                "The answer is \\boxed{7}\n"]
    assert [n.parent for n in steps.nodes[1:]] == [0, 1, 2, 1, 4]
    assert steps.nodes[1].scores["paths"] == 2
    assert [(n.finish_reason, n.scores.get("outcome")) for n in steps.nodes[1:] if n.finished] == [("boxed", 1.0), ("boxed", 0.0)]
    assert ReasoningTree.from_json(steps.to_json()).to_json() == steps.to_json()


# -- the rationale format --------------------------------------------------------------------------

def test_rationale_records(tool, tmp_path):
    tree = hand_built_tree()
    extra = tree.add(1, "5+1=6 apples\n", [])
    tree.add(extra.id, "The answer is \\boxed{6}", [], finish_reason="eos", outcome=1.0)
    gp.annotate([tree], tool)
    kept, _ = gp.agreeing_paths(tree)
    records = gp.rationale_records(kept)
    assert len(records) == sum(len(p.labels) for p in kept)
    for record in records:
        completion = record["completion"]
        assert completion.startswith("<verify>\n") and "</verify>\n<judge>\n" in completion
        assert ("[Right]" in completion) == (record["label"] == "+") and ("[Wrong]" in completion) == (record["label"] == "-")
        assert completion.endswith(f"\\boxed{{{record['label']}}}\n</output>")
        assert gp.parse_verdict(completion) == (record["label"] == "+")
        assert record["prompt"].endswith("Assistant: ") and record["messages"][-1]["content"] == completion
    wrong = [r for r in records if r["label"] == "-" and r["step"] == 1][0]
    assert "5+1 = 7, but 5+1 is 6" in wrong["completion"]
    assert "Step 2: 5+1=7" in wrong["prompt"] and "Step 1: 2+3=5" in wrong["prompt"]
    assert wrong["prompt"].count("<verify>") == 1 + 1  # the instructions mention it, and step 1's rationale
    # the SFT recipe reads them as prompt / completion records
    from treetune.trainers.sft.config import SFTScriptArguments
    from treetune.trainers.sft.trainer import training_records

    path = gp.write_records(records, tmp_path / "rationale.jsonl")
    rows = training_records(SFTScriptArguments(source="records", data_path=str(path)))
    assert rows == [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    assert json.loads(path.read_text().splitlines()[0])["messages"][0]["role"] == "system"


def test_parse_verdict():
    assert gp.parse_verdict("... \\boxed{-} then \\boxed{+}") is True
    assert gp.parse_verdict("The conclusion is [Wrong]") is False
    assert gp.parse_verdict("no verdict") is None


def test_simulations_from_the_policy_feed_the_backup(tool, tiny_policy_path):
    from treetune.data import PromptTemplate, load_problems
    from treetune.rewards.grading import Grader
    from treetune.rollouts.engines import HFEngine
    from treetune.rollouts.run import new_tree

    problem = load_problems("arith", "test", limit=1)[0]
    engine = HFEngine(tiny_policy_path)
    tree = new_tree(problem, PromptTemplate(style="bare"), engine.tokenizer)
    first = tree.add(0, problem.solution.split("\n")[0] + "\n", [])  # the gold first step, nothing below it yet
    with Grader(processes=1) as grader:
        made = gp.simulate([tree], engine, tool, grader, k=3, max_tokens=64, seed=0)
        assert made == 3 and gp.simulate([tree], engine, tool, grader, k=3) == 0  # topped up once only
    rewards = first.scores["rollout_rewards"]
    assert len(rewards) == 3 and all(-2.0 <= r <= 2.0 for r in rewards)
    gp.annotate([tree], tool)
    assert first.scores["grounded_reward"] == pytest.approx(sum(rewards) / 3)
    assert first.scores["grounded"] == first.scores["grounded_reward"] and first.scores["grounded_visits"] == 1


def test_the_tool_drives_step_search_by_name():
    from treetune.rewards.scorers import load_scorer

    scorer = load_scorer("tool")
    scores = scorer.score(["Mia has 7 pens. She gets 5 more. She gives away 3."], [["7+5=12", "12-3=8"]])
    assert scores == [[1.0, 0.0]]


# -- a data run's steps and the data job ------------------------------------------------------------

def flat_hand_tree() -> ReasoningTree:
    """`hand_built_tree`'s three paths as a flat sampler stores them: one node per whole solution."""
    tree = ReasoningTree(problem_id="p", prompt=QUESTION + "\n", prompt_ids=[1], answer="6", problem={"question": QUESTION})
    for middle, answer, outcome in (("5+1=6", 6, 1.0), ("5+1=7", 7, 0.0), ("5+2=7", 7, 0.0)):
        tree.add(0, f"2+3=5\n{middle}\nThe answer is \\boxed{{{answer}}}", [1], [-0.1], "eos", outcome=outcome)
    return tree


def test_label_trees_turns_any_sampler_tree_into_backed_up_step_trees(tool):
    (steps,), simulated = gp.label_trees([flat_hand_tree()], tool, gamma=0.9)
    assert simulated == 0
    assert [n.text.strip() for n in steps.nodes[1:]] == [n.text.strip() for n in hand_built_tree().nodes[1:]]
    a, b, d, c, e, g, h = steps.nodes[1:]
    # the values test_backup_on_a_hand_built_tree derives by hand
    assert [n.scores["tool"] for n in (a, b, d, c, e, g, h)] == [1, 1, 1, -1, 1, 1, 1]
    assert [n.scores["verdict"] for n in (d, e, h)] == [1, -1, -1]
    assert b.scores["grounded"] == pytest.approx(1.9) and c.scores["grounded"] == pytest.approx(-1.9)
    assert a.scores["grounded"] == pytest.approx(0.9 * (1.9 - 1.9 - 1.9)) and a.scores["grounded_visits"] == 7
    with pytest.raises(ValueError, match="simulations need"):
        gp.label_trees([flat_hand_tree()], tool, simulations=2)


def test_kept_paths_records_and_data_metrics_over_several_trees(tool):
    agreeing = hand_built_tree()
    extra = agreeing.add(1, "5+1=6 apples\n", [])
    agreeing.add(extra.id, "The answer is \\boxed{6}", [], finish_reason="eos", outcome=1.0)
    agreeing.problem_id = "q"
    trees = [agreeing, hand_built_tree()]  # in the second, A's value is negative although its step is right
    gp.annotate(trees, tool)
    kept, finished = gp.agreeing_paths_of(trees)
    assert finished == 4 + 3 and [p.problem_id for p in kept] == ["q", "q", "q"]
    records = gp.rationale_records(kept)
    metrics = gp.data_metrics(trees, kept, finished, records)
    assert metrics == {"problems": 2, "step_nodes": 9 + 7,
                       "tool_verdicts": {"correct": 8 + 6, "incorrect": 1 + 1, "unverifiable": 0},
                       "finished_paths": 7, "kept_paths": 3, "kept_share": 3 / 7, "kept_correct_outcome": 2,
                       "records": 3 + 3 + 3, "records_positive": 3 + 3 + 1, "records_negative": 2}


def test_checker_agreement_counts_labels_up_to_the_checkers_first_error():
    from treetune.data import load_problems

    problem = load_problems("arith", "test", limit=1)[0]
    tree = ReasoningTree(problem_id=problem.id, prompt=problem.question + "\n", prompt_ids=[1], answer=problem.answer,
                         problem={"question": problem.question, "source": "arith", **problem.extra})
    gold = problem.solution.split("\n")
    n = len(gold)
    left, result = gold[1].split("=")
    wrong = [gold[0], f"{left}={int(result) + 1}", *gold[2:]]  # the checker's first error: step 1

    def path(steps, labels):
        return gp.GroundedPath(problem.id, problem.question, steps, [1.0] * len(steps), [1] * len(steps),
                               [{}] * len(steps), labels, all(labels))

    paths = [path(gold, [True] * n),  # all agree
             path(gold, [True, False] + [True] * (n - 2)),  # one disagrees
             path(wrong, [True, False, False]),  # two agree; the third is after the first error
             path(gold[:2], [True, True])]  # stops before its answer: wrong at its last step, so one disagrees
    result = gp.checker_agreement(paths, {problem.id: tree})
    agree = n + (n - 1) + 2 + 1
    assert result == {"labels_compared": agree + 2, "agreement": agree / (agree + 2), "labels_after_first_error": 1}
    assert gp.checker_agreement([], {}) == {"labels_compared": 0, "agreement": None, "labels_after_first_error": 0}


@pytest.mark.slow
def test_the_data_job_on_the_tiny_policy(tmp_path):
    from dataclasses import asdict

    from treetune.launch.grounded_prm_data import GroundedDataArgs, run

    args = GroundedDataArgs(output_dir=str(tmp_path / "data"), kv_cache_gb=0.25, limit=3, split="train", trajectories=4,
                            max_tokens=96, simulations=3, simulation_max_tokens=48, tool_workers=1)
    metrics = run(args)
    out = tmp_path / "data"
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(asdict(args)))
    step_trees = [ReasoningTree.from_json(line) for line in (out / "step_trees.jsonl").open()]
    assert len(step_trees) == metrics["problems"] == 3
    assert all("grounded" in n.scores and "tool" in n.scores for t in step_trees for n in t.nodes[1:])
    kept, finished = gp.agreeing_paths_of(step_trees)  # the filter again, on what the job wrote
    records = [json.loads(line) for line in (out / "rationale.jsonl").open()]
    assert (metrics["finished_paths"], metrics["kept_paths"]) == (finished, len(kept))
    assert len(records) == metrics["records"] == sum(len(p.labels) for p in kept)
    assert [r["label"] for r in records] == ["+" if label else "-" for p in kept for label in p.labels]
    assert metrics["checker_agreement"] == gp.checker_agreement(kept, {t.problem_id: t for t in step_trees})
    assert metrics["simulated_completions"] > 0 and metrics["rollout"]["problems"] == 3
    with pytest.raises(ValueError, match="field 'scorer'"):
        run(GroundedDataArgs(output_dir=str(tmp_path / "other"), scorer="arith_checker"))
