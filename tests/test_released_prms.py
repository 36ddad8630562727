"""Released PRM conventions (Qwen2.5-Math-PRM, Math-Shepherd) on tiny randomly initialised models
built in those formats: the layouts and read-out positions are under test, not the weights. Then
every job that takes a scorer (rollout search, MCTS-DPO, best-of-N, eval_prm, Step-DPO and BVPO
data) is run with one, to show it reaches the PRM through the shared `--scorer` fields."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from treetune.rewards.scorers import load_scorer
from treetune.rewards.scorers.released import QWEN_STEP_TOKEN, SHEPHERD_TAG, MathShepherdPRM, QwenMathPRM

# Qwen's ChatML layout, as the released tokenizer's template renders system / user / assistant turns
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

QUESTION = "Mia has 7 pens and buys 15 more. How many pens does she have?"
SOLUTIONS = [["7+15=22", "The answer is \\boxed{22}"],
             ["7+15=21", "21-1=20", "The answer is \\boxed{20}"],
             ["The answer is \\boxed{22}"]]


def _tiny_qwen2(vocab_size: int, **extra):
    from transformers import Qwen2Config

    torch.manual_seed(0)
    return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)


@pytest.fixture(scope="module")
def qwen_prm_dir(tiny_policy_path, tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2ForTokenClassification

    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", QWEN_STEP_TOKEN]})
    tok.chat_template = CHATML
    model = Qwen2ForTokenClassification(_tiny_qwen2(len(tok), num_labels=2))
    out = tmp_path_factory.mktemp("qwen-prm")
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def shepherd_prm_dir(tiny_policy_path, tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_policy_path)
    model = Qwen2ForCausalLM(_tiny_qwen2(len(tok)))
    out = tmp_path_factory.mktemp("shepherd-prm")
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return str(out)


def test_qwen_layout_puts_the_step_token_after_every_step(qwen_prm_dir):
    prm = QwenMathPRM(qwen_prm_dir)
    text = prm.render(QUESTION, SOLUTIONS[1])
    assert text.startswith("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                           "\\boxed{}.<|im_end|>\n<|im_start|>user\n" + QUESTION)
    assistant = text.split("<|im_start|>assistant\n", 1)[1]
    assert assistant == "7+15=21<extra_0>21-1=20<extra_0>The answer is \\boxed{20}<extra_0><|im_end|>\n"


def test_qwen_scores_are_class_one_at_each_step_token_and_batching_changes_nothing(qwen_prm_dir):
    prm = QwenMathPRM(qwen_prm_dir, batch_size=3)
    batched = prm.score([QUESTION] * 3, SOLUTIONS)
    assert [len(s) for s in batched] == [2, 3, 1]
    one_by_one = QwenMathPRM(qwen_prm_dir, batch_size=1).score([QUESTION] * 3, SOLUTIONS)
    for a, b in zip(batched, one_by_one):
        assert a == pytest.approx(b, abs=1e-5)
    # by hand: softmax of the head's two logits at the positions holding <extra_0>
    ids = prm.tokenizer(prm.render(QUESTION, SOLUTIONS[1]), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = prm.model(input_ids=ids).logits[0]
    positions = (ids[0] == prm.tokenizer.convert_tokens_to_ids(QWEN_STEP_TOKEN)).nonzero().flatten()
    assert len(positions) == 3
    expected = torch.softmax(logits[positions], -1)[:, 1].tolist()
    assert batched[1] == pytest.approx(expected, abs=1e-5)
    assert all(0.0 <= v <= 1.0 for s in batched for v in s)


def test_qwen_refuses_a_tokenizer_without_the_step_token(shepherd_prm_dir):
    with pytest.raises(ValueError, match="extra_0"):
        QwenMathPRM(shepherd_prm_dir)


def test_shepherd_layout_and_tag_read_at_its_last_token(shepherd_prm_dir):
    prm = MathShepherdPRM(shepherd_prm_dir)
    text = prm.render(QUESTION, SOLUTIONS[0])
    assert text == QUESTION + " 7+15=22 ки\n\nThe answer is \\boxed{22} ки"
    enc = prm.tokenizer(text, return_offsets_mapping=True)
    positions = prm._tag_positions(text, enc["offset_mapping"])
    assert len(positions) == 2
    tag_tokens = prm.tokenizer(SHEPHERD_TAG, add_special_tokens=False)["input_ids"]
    # the byte-level tokenizer splits the Cyrillic tag over several tokens: the read-out is the last
    assert len(tag_tokens) > 1
    for p in positions:
        assert enc["input_ids"][p] == tag_tokens[-1]
        assert enc["input_ids"][p - len(tag_tokens) + 1:p + 1] == tag_tokens


def test_shepherd_scores_are_p_plus_against_minus(shepherd_prm_dir):
    prm = MathShepherdPRM(shepherd_prm_dir, batch_size=3)
    batched = prm.score([QUESTION] * 3, SOLUTIONS)
    assert [len(s) for s in batched] == [2, 3, 1]
    one_by_one = MathShepherdPRM(shepherd_prm_dir, batch_size=1).score([QUESTION] * 3, SOLUTIONS)
    for a, b in zip(batched, one_by_one):
        assert a == pytest.approx(b, abs=1e-5)
    text = prm.render(QUESTION, SOLUTIONS[1])
    enc = prm.tokenizer(text, return_offsets_mapping=True)
    positions = prm._tag_positions(text, enc["offset_mapping"])
    with torch.no_grad():
        logits = prm.model(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
    plus, minus = prm.candidate_ids
    assert prm.tokenizer.decode([plus]).strip() == "+" and prm.tokenizer.decode([minus]).strip() == "-"
    expected = torch.softmax(logits[positions][:, [plus, minus]], -1)[:, 0].tolist()
    assert batched[1] == pytest.approx(expected, abs=1e-5)


def test_shepherd_refuses_a_step_holding_the_tag(shepherd_prm_dir):
    with pytest.raises(ValueError, match="step tag"):
        MathShepherdPRM(shepherd_prm_dir).score([QUESTION], [["7+15=22 ки"]])


def test_truncated_steps_score_zero_and_formats_load_by_name(qwen_prm_dir, shepherd_prm_dir):
    full = QwenMathPRM(qwen_prm_dir)
    ids = full.tokenizer(full.render(QUESTION, SOLUTIONS[1]), add_special_tokens=False)["input_ids"]
    second_step_end = [i for i, t in enumerate(ids) if t == full.step_id][1]
    cut = load_scorer(qwen_prm_dir, "qwen", max_length=second_step_end + 1)
    scores = cut.score([QUESTION], [SOLUTIONS[1]])[0]
    assert scores[:2] == pytest.approx(full.score([QUESTION], [SOLUTIONS[1]])[0][:2], abs=1e-5)
    assert len(scores) == 3 and scores[2] == 0.0
    assert isinstance(load_scorer(shepherd_prm_dir, "shepherd"), MathShepherdPRM)
    with pytest.raises(ValueError, match="unknown scorer format 'orm'; expected one of treetune, qwen, shepherd"):
        load_scorer(qwen_prm_dir, "orm")


# -- every job that takes a scorer takes a released PRM ------------------------------------------
RELEASED = {"qwen": QwenMathPRM, "shepherd": MathShepherdPRM}
JOBS = ("rollout", "mcts_dpo", "best_of_n", "eval_prm", "step_dpo_data", "bvpo_data")


@pytest.fixture(scope="module")
def released(qwen_prm_dir, shepherd_prm_dir) -> dict[str, str]:
    return {"qwen": qwen_prm_dir, "shepherd": shepherd_prm_dir}


def parse_job(job: str, argv: list[str]):
    """The job's recipe from a command line, as its `main` parses it (old names renamed)."""
    from treetune.launch import best_of_n, bvpo_data, eval_prm, rollout, step_dpo_data
    from treetune.rewards.scorers import RENAMED_FIELDS
    from treetune.trainers.common import parse_config, parse_recipe

    if job == "mcts_dpo":
        from trl import ModelConfig
        from treetune.trainers.mcts_dpo.config import MCTSDPOConfig
        from treetune.trainers.mcts_dpo.loop import MCTSDPOArgs

        return parse_recipe((MCTSDPOArgs, MCTSDPOConfig, ModelConfig), argv, renamed=RENAMED_FIELDS)
    types = {"rollout": rollout.RolloutArgs, "best_of_n": best_of_n.BestOfNArgs, "eval_prm": eval_prm.EvalPRMArgs,
             "step_dpo_data": step_dpo_data.StepDPODataArgs, "bvpo_data": bvpo_data.BVPODataArgs}[job]
    renamed = bvpo_data.RENAMED if job == "bvpo_data" else RENAMED_FIELDS
    return parse_config((types,), argv, renamed=renamed)


def step_scorer_of(job: str, args):
    """The step scorer the job builds from its recipe (BVPO wraps it as a response scorer)."""
    from treetune.rewards.scorers import scorer_from_args
    from treetune.trainers.bvpo.pairs import response_scorer

    if job == "bvpo_data":
        return response_scorer(args.scorer, args.scorer_format, step_mode=args.step_mode).step_scorer
    return scorer_from_args(args)


@pytest.mark.parametrize("fmt", sorted(RELEASED))
@pytest.mark.parametrize("job", JOBS)
def test_every_scorer_taking_job_builds_a_released_prm_from_its_command_line(job, fmt, released, tmp_path):
    args = parse_job(job, ["--scorer", released[fmt], "--scorer_format", fmt, "--step_mode", "blank_line",
                           "--output_dir", str(tmp_path)])[0]
    assert (args.scorer, args.scorer_format, args.step_mode) == (released[fmt], fmt, "blank_line")
    scorer = step_scorer_of(job, args)
    assert isinstance(scorer, RELEASED[fmt])
    direct = RELEASED[fmt](released[fmt]).score([QUESTION], [SOLUTIONS[1]])
    assert scorer.score([QUESTION], [SOLUTIONS[1]])[0] == pytest.approx(direct[0], abs=1e-6)


@pytest.mark.parametrize("job, old, new", [
    ("best_of_n", ["--prm_path", "{qwen}", "--prm_format", "qwen", "--prm_separator", "\\n\\n"],
     ("{qwen}", "qwen", "blank_line")),
    ("eval_prm", ["--scorer", "prm", "--prm_path", "{shepherd}", "--prm_format", "shepherd", "--separator", "\\n"],
     ("{shepherd}", "shepherd", "line")),
    ("rollout", ["--scorer", "{qwen}", "--prm_separator", "\\n\\n", "--scorer_format", "qwen"], ("{qwen}", "qwen", "blank_line")),
    ("step_dpo_data", ["--scorer", "prm", "--scorer_path", "{shepherd}", "--scorer_format", "shepherd"],
     ("{shepherd}", "shepherd", "line")),
    ("bvpo_data", ["--scorer", "prm", "--scorer_path", "{qwen}", "--scorer_format", "qwen"], ("{qwen}", "qwen", "line")),
])
def test_old_scorer_flags_still_work_for_one_release(job, old, new, released):
    fill = lambda text: text.format(**released)  # noqa: E731
    with pytest.warns(FutureWarning, match="deprecated"):
        args = parse_job(job, [fill(a) for a in old])[0]
    assert (args.scorer, args.scorer_format, args.step_mode) == tuple(fill(x) for x in new)


def test_old_scorer_fields_in_a_yaml_recipe(released, tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"scorer: prm\nscorer_path: {released['shepherd']}\nscorer_format: shepherd\nstep_mode: line\n")
    with pytest.warns(FutureWarning, match="scorer_path"):
        (args,) = parse_job("step_dpo_data", ["--config", str(recipe)])
    assert (args.scorer, args.scorer_format) == (released["shepherd"], "shepherd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names warn about nothing
        parse_job("step_dpo_data", ["--scorer", released["shepherd"], "--scorer_format", "shepherd"])


def test_a_bad_scorer_names_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="expected arith_checker, tool, self_eval, or a PRM folder / hub name"):
        load_scorer("checker")
    with pytest.raises(ValueError, match="is now `--scorer PATH`"):
        load_scorer("prm")
    with pytest.raises(ValueError, match="needs the policy's engine"):
        load_scorer("self_eval")
    with pytest.raises(ValueError, match="field 'scorer_format'.*expected one of treetune, qwen, shepherd, thinkprm"):
        parse_job("rollout", ["--scorer_format", "orm"])
    assert load_scorer(None) is None and load_scorer("") is None


def test_eval_prm_scores_arith_trees_with_a_released_prm(released, tmp_path):
    from treetune.data.arith import arith_problems
    from treetune.data.steps import split_steps
    from treetune.launch import eval_prm
    from treetune.rollouts.tree import ReasoningTree
    from treetune.rollouts.tree_io import TreeWriter

    with TreeWriter(tmp_path / "trees") as writer:
        for p in arith_problems("test", 6):
            tree = ReasoningTree(problem_id=p.id, prompt=p.question + "\n", prompt_ids=[1], answer=p.answer,
                                 problem={"question": p.question, **p.extra})
            steps = split_steps(p.solution, "line")
            wrong = [steps[0].replace("=", "=9"), *steps[1:]]
            for text in ("\n".join(steps), "\n".join(wrong)):
                tree.add(0, text, [1], [-0.1], "eos")
            writer.write(tree)
    (args,) = parse_job("eval_prm", ["--scorer", released["qwen"], "--scorer_format", "qwen", "--arith_trees",
                                     str(tmp_path / "trees"), "--thresholds", "0.5", "--output_dir", str(tmp_path / "eval")])
    metrics = eval_prm.run(args)
    arith = metrics["best"]["splits"]["arith"]
    assert arith["erroneous"] == 6 and arith["correct"] == 6 and metrics["scorer_format"] == "qwen"
    # the F1 is what the PRM's own step scores give at 0.5, computed here without the job
    from treetune.rewards.evaluation.processbench import arith_cases, evaluate_splits
    from treetune.rollouts.tree_io import read_trees

    questions, solutions, truth = arith_cases(list(read_trees(tmp_path / "trees")))
    expected = evaluate_splits({"arith": QwenMathPRM(released["qwen"]).score(questions, solutions)}, {"arith": truth}, [0.5])
    assert arith["f1"] == pytest.approx(expected["0.5"]["splits"]["arith"]["f1"])
    assert json.loads((tmp_path / "eval" / "config.json").read_text())["scorer_format"] == "qwen"


# The jobs end to end on the tiny policy in vLLM, each driven by a released-format PRM.
SMALL = ["--kv_cache_gb", "0.25", "--max_tokens", "48"]


def _prm_value(prm_dir: str, fmt: str, tree, node_id: int, how: str = "last") -> float:
    from treetune.rollouts.scoring import aggregate
    from treetune.rollouts.step_search import path_steps

    steps = path_steps(tree, node_id, "\n")
    return aggregate(RELEASED[fmt](prm_dir).score([tree.problem["question"]], [steps])[0], how)


@pytest.mark.slow
def test_rollout_beam_search_is_driven_by_a_released_prm(released, tmp_path, tiny_policy_path):
    from treetune.launch import rollout
    from treetune.rollouts.tree_io import read_trees

    (args,) = parse_job("rollout", ["--sampler", "beam", "--scorer", released["qwen"], "--scorer_format", "qwen",
                                    "--limit", "2", "--trajectories", "4", "--search_width", "2", "--step_tokens", "16",
                                    "--output_dir", str(tmp_path), *SMALL])
    metrics = rollout.run(args)
    assert metrics["problems"] == 2 and (tmp_path / "config.json").exists()
    trees = list(read_trees(tmp_path / "trees"))
    assert all(t.sampler["scorer"] == "qwen_math_prm" for t in trees)
    tree = trees[0]
    node = next(n for n in tree.nodes[1:] if not n.finished)  # an unfinished step: valued by the PRM alone
    assert node.scores["search_value"] == pytest.approx(_prm_value(released["qwen"], "qwen", tree, node.id), abs=1e-5)


@pytest.mark.slow
def test_mcts_dpo_search_is_driven_by_a_released_prm(released, tmp_path, tiny_policy_path):
    from treetune.rewards.grading import Grader
    from treetune.rollouts.tree_io import read_trees
    from treetune.trainers.mcts_dpo.loop import close_engine, open_engine, round_dir, search_round

    args, config, model_args = parse_job("mcts_dpo", [
        "--scorer", released["shepherd"], "--scorer_format", "shepherd", "--problems_per_round", "2",
        "--mcts_iterations", "2", "--search_width", "2", "--search_max_tokens", "48", "--kv_cache_gb", "0.25",
        "--output_dir", str(tmp_path), "--report_to", "none"])
    engine = open_engine(args, tiny_policy_path)
    try:
        with Grader(processes=1) as grader:
            search_round(args, config, model_args, 0, engine, grader)
    finally:
        close_engine(engine)
    trees = list(read_trees(round_dir(config, 0) / "search" / "trees"))
    assert len(trees) == 2 and all(t.sampler["scorer"] == "math_shepherd" for t in trees)
    tree = next(t for t in trees if any(not n.finished for n in t.nodes[1:]))
    node = next(n for n in tree.nodes[1:] if not n.finished)
    assert node.scores["search_value"] == pytest.approx(_prm_value(released["shepherd"], "shepherd", tree, node.id), abs=1e-5)


@pytest.mark.slow
def test_best_of_n_selects_with_a_released_prm(released, tmp_path, tiny_policy_path):
    from treetune.launch import best_of_n

    (args,) = parse_job("best_of_n", ["--scorer", released["shepherd"], "--scorer_format", "shepherd", "--limit", "3",
                                      "--n", "4", "--selectors", "prm_min,majority", "--subsamples", "2",
                                      "--output_dir", str(tmp_path), *SMALL])
    metrics = best_of_n.run(args)
    assert set(metrics["selectors"]) == {"prm_min", "majority"}
    # prm_min's pick at N = 4 is the sample whose lowest PRM step score is highest, found here by hand
    from treetune.data.arith import arith_problems
    from treetune.data.steps import split_steps

    questions = {p.id: p.question for p in arith_problems("test", 3)}
    prm = MathShepherdPRM(released["shepherd"])
    rows = [json.loads(line) for line in (tmp_path / "problems.jsonl").open()]
    assert len(rows) == 3
    for row in rows:
        steps = [split_steps(sample["text"], "line") for sample in row["samples"]]
        lows = [min(s) if s else None for s in prm.score([questions[row["id"]]] * len(steps), steps)]
        best = max((low, -i) for i, low in enumerate(lows) if low is not None)
        assert row["selected"]["prm_min"] == -best[1]


@pytest.mark.slow
def test_step_dpo_data_locates_errors_with_a_released_prm(released, tmp_path, tiny_policy_path):
    from treetune.launch import step_dpo_data

    # a threshold above every score: the PRM calls each wrong sample's first step wrong, so no
    # problem with a wrong sample can end with "scorer found no wrong step"
    (args,) = parse_job("step_dpo_data", ["--scorer", released["qwen"], "--scorer_format", "qwen", "--limit", "4",
                                          "--samples", "4", "--continuations", "2", "--error_threshold", "1.01",
                                          "--temperature", "1.0", "--output_dir", str(tmp_path), *SMALL])
    metrics = step_dpo_data.run(args)
    assert metrics["problems"] == 4
    assert metrics["problems_with_pairs"] + sum(metrics["why_no_pairs"].values()) == 4
    assert "scorer found no wrong step" not in metrics["why_no_pairs"]
    assert metrics["why_no_pairs"].get("no wrong sample", 0) < 4, "the tiny policy should get some of 16 samples wrong"
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").open()]
    assert all(p["step_index"] == 0 and p["initial_reason_steps"] == "" for p in pairs)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_bvpo_data_ranks_responses_with_a_released_prm(released, tmp_path):
    from treetune.data import ProblemArgs
    from treetune.data.steps import split_steps
    from treetune.launch import bvpo_data
    from treetune.trainers.bvpo.pairs import final_part

    (args,) = parse_job("bvpo_data", ["--scorer", released["shepherd"], "--scorer_format", "shepherd", "--limit", "2",
                                      "--samples", "3", "--empty_max_tokens", "16", "--temperature", "1.0",
                                      "--output_dir", str(tmp_path), *SMALL])
    metrics = bvpo_data.run(args)
    assert metrics["scorer"] == "math_shepherd"
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").open()]
    assert pairs, metrics
    questions = {p.id: p.question for p in ProblemArgs(split="train", limit=2).load()}
    prm = MathShepherdPRM(released["shepherd"])
    for pair in pairs:  # each pair's scores are the PRM's min step score of its answer part
        for side in ("chosen", "rejected"):
            steps = split_steps(final_part(pair[side]), "line")
            expected = min(prm.score([questions[pair["problem_id"]]], [steps])[0]) if steps else 0.0
            assert pair[f"{side}_score"] == pytest.approx(expected, abs=1e-5)
        assert pair["chosen_score"] > pair["rejected_score"]
