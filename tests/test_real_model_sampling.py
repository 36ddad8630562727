"""The sampling and labelling jobs on a real pretrained LLM (SmolLM2-135M-Instruct: Llama architecture,
49,152-token BPE, ChatML template) and the real data files, run as a user runs them: each job's
recipe parsed from a command line and its `run`, on GSM8K, MATH-500, ProcessBench and arith.

All jobs share one vLLM engine serving SmolLM2 (a start costs 15-30 s; each job takes a caller's
engine through `run(args, engine)`): the whole file took 2.5 minutes on 2 shared, busy CPU cores. Each
test checks what a user would look at: the chat template in the prompt ids, step boundaries where the
text puts them, labels on the steps they belong to, the metrics and config files, trees that reload.
The fast tests at the bottom cover the errors and helpers these runs led to.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from treetune.data import PromptTemplate, load_problems
from treetune.data.answers import extract_answer
from treetune.data.arith import check_solution, tiny_policy
from treetune.data.pretrained import qwen_tokenizer
from treetune.data.steps import split_steps, step_ends
from treetune.launch import best_of_n, eval_prm, grounded_prm_data, prm_labels, rollout, think_prm_data
from treetune.rewards.grading import Grader, grade_many
from treetune.rewards.labels.mc import mc_estimate
from treetune.rewards.scorers import RENAMED_FIELDS
from treetune.rewards.scorers.think_prm import solution_lines
from treetune.rollouts.engines import GenerationRequest, SamplingSettings
from treetune.rollouts.engines.base import TORN, continuation_text
from treetune.rollouts.run import EngineArgs, RolloutArgs
from treetune.rollouts.tree import ReasoningTree
from treetune.rollouts.tree_io import read_trees
from treetune.trainers.common import parse_config

ROOT = Path(__file__).resolve().parents[1]
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def parse(args_type, argv: list[str], renamed=None):
    """The job's recipe from a command line, as its `main` parses it."""
    (args,) = parse_config((args_type,), argv, renamed=renamed)
    return args


@pytest.fixture(scope="module")
def model(smollm2_path) -> str:
    return smollm2_path


@pytest.fixture(scope="module")
def engine(smollm2_engine):
    """SmolLM2 in vLLM: the session's one engine (tests/conftest.py)."""
    return smollm2_engine


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.tokenizer


def check_chat_prompt(tree, question: str, tokenizer) -> None:
    """The prompt is SmolLM2's ChatML rendering of the question, token ids and text alike."""
    assert tree.prompt_ids[0] == tokenizer.convert_tokens_to_ids(IM_START)
    assert tokenizer.decode(tree.prompt_ids) == tree.prompt
    assert tree.prompt.startswith(f"{IM_START}system\nPlease reason step by step")
    assert f"{IM_START}user\n{question}{IM_END}" in tree.prompt
    assert tree.prompt.endswith(f"{IM_START}assistant\n")


def check_nodes(tree, tokenizer) -> None:
    """Every node's text is what its tokens decode to (the end-of-turn token kept in the ids only),
    with one log-prob per sampled token."""
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    for node in tree.nodes[1:]:
        assert node.token_ids and len(node.logprobs) == len(node.token_ids)
        assert all(lp <= 0.0 for lp in node.logprobs)
        ids = node.token_ids[:-1] if node.finish_reason == "eos" and node.token_ids[-1] == eos else node.token_ids
        assert tokenizer.decode(ids) == node.text


# -- rollout: flat samples on GSM8K, TreePO segment trees on MATH-500 ---------------------------------

@pytest.fixture(scope="module")
def flat_run(model, engine, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("flat")
    argv = ["--config", str(ROOT / "configs/rollout/flat.yaml"), "--model_name_or_path", model, "--source", "gsm8k",
            "--data_path", str(shared_data / "gsm8k/test.jsonl"), "--limit", "2", "--trajectories", "3",
            "--max_tokens", "80", "--output_dir", str(out)]
    args = parse(RolloutArgs, argv, RENAMED_FIELDS)
    return args, rollout.run(args, engine), out


@pytest.fixture(scope="module")
def treepo_run(model, engine, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("treepo")
    argv = ["--config", str(ROOT / "configs/rollout/treepo.yaml"), "--model_name_or_path", model, "--source", "math500",
            "--data_path", str(shared_data / "math500/test.jsonl"), "--limit", "2", "--trajectories", "4",
            "--segment_tokens", "24", "--max_depth", "4", "--max_tokens", "96", "--output_dir", str(out)]
    args = parse(RolloutArgs, argv, RENAMED_FIELDS)
    return args, rollout.run(args, engine), out


@pytest.mark.slow
def test_rollout_flat_on_gsm8k(flat_run, engine, tokenizer, shared_data):
    args, metrics, out = flat_run
    assert args.prompt_style is None  # picked: SmolLM2's tokenizer has a chat template
    problems = {p.id: p for p in load_problems("gsm8k", "test", path=shared_data / "gsm8k/test.jsonl", limit=2)}
    trees = list(read_trees(out / "trees"))
    assert sorted(t.problem_id for t in trees) == sorted(problems)
    for tree in trees:
        problem = problems[tree.problem_id]
        assert tree.answer == problem.answer  # the "#### N" line of the file
        check_chat_prompt(tree, problem.question, tokenizer)
        check_nodes(tree, tokenizer)
        assert len(tree.leaves()) == 3 and all(n.parent == 0 and len(n.token_ids) <= 80 for n in tree.nodes[1:])
    texts = [t.path_text(leaf.id) for t in trees for leaf in t.leaves()]
    golds = [t.answer for t in trees for _ in t.leaves()]
    assert [leaf.scores["outcome"] for t in trees for leaf in t.leaves()] == [float(g) for g in grade_many(texts, golds)]
    # the files a user reads
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["problems"] == 2 and metrics["trajectories"] == 6
    assert metrics["decoded_tokens"] == sum(t.decoded_tokens() for t in trees)
    assert metrics["prompt_tokens_sent_this_run"] >= sum(len(t.prompt_ids) for t in trees)
    assert sum(metrics["finish_reasons"].values()) == 6 and set(metrics["finish_reasons"]) <= {"eos", "length"}
    assert 0.0 <= metrics["trajectory_accuracy"] <= metrics["pass_at_all"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert (config["sampler"], config["source"], config["model_name_or_path"]) == ("flat", "gsm8k", args.model_name_or_path)
    # the shards load with datasets, and a second run on the folder samples nothing new
    import datasets

    rows = datasets.load_dataset("json", data_files=sorted(map(str, (out / "trees").glob("*.jsonl"))), split="train")
    assert sorted(rows["problem_id"]) == sorted(problems)
    again = rollout.run(args, engine)
    assert again["new_trees"] == 0 and again["trajectories"] == 6


@pytest.mark.slow
def test_rollout_treepo_on_math500(treepo_run, tokenizer, shared_data):
    args, metrics, out = treepo_run
    problems = {p.id: p for p in load_problems("math500", "test", path=shared_data / "math500/test.jsonl", limit=2)}
    trees = list(read_trees(out / "trees"))
    assert sorted(t.problem_id for t in trees) == sorted(problems)
    for tree in trees:
        problem = problems[tree.problem_id]
        assert tree.answer == problem.answer and tree.problem["level"] == problem.extra["level"]
        check_chat_prompt(tree, problem.question, tokenizer)
        check_nodes(tree, tokenizer)
        # the root forks init_divergence ways; a fallback that cuts a path back to the root forks it again
        fallbacks = tree.sampler["stats"]["fallbacks"]
        assert args.init_divergence <= len(tree.children(0)) <= args.init_divergence + fallbacks * args.branch
        assert len(tree.leaves()) == args.trajectories
        assert all(len(n.token_ids) <= args.segment_tokens for n in tree.nodes[1:])
        for leaf in tree.leaves():
            path, ids = tree.path(leaf.id), tree.path_token_ids(leaf.id)
            assert len(path) <= args.max_depth and len(ids) <= args.max_tokens
            # an unfinished segment is cut at its token budget, and the segments' texts put together are
            # the path's tokens decoded as one (no character torn at a segment boundary)
            assert all(len(n.token_ids) == args.segment_tokens for n in path[:-1])
            assert tree.path_text(leaf.id) == tokenizer.decode(ids, skip_special_tokens=True)
        assert tree.sampler["name"] == "treepo"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["trajectories"] == 2 * args.trajectories
    # shared prefixes are decoded once: fewer tokens than the trajectories' total length
    assert metrics["decoded_tokens_per_trajectory"] < metrics["trajectory_tokens_mean"]
    assert 0.0 < metrics["prefix_cache_hit_rate"] <= 1.0


@pytest.mark.slow
def test_a_segment_after_a_torn_character_gets_its_own_text(engine, tokenizer):
    """SmolLM2 spells an emoji over four byte tokens; a segment may end inside it. The next
    segment's text must be its own (vLLM alone returned the whole prompt's text in front of it)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat: 🐍🐍🐍🐍"}], tokenize=False,
                                           add_generation_prompt=True) + "🐍"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:-1]).endswith(TORN)  # the prompt ends inside the emoji
    result = engine.generate([GenerationRequest(ids[:-1], SamplingSettings(max_tokens=6, temperature=0.0))])[0]
    completion = result.completions[0]
    assert "Repeat" not in completion.text
    whole = tokenizer.decode(ids[:-1] + completion.token_ids, skip_special_tokens=True).rstrip(TORN)
    assert whole == tokenizer.decode(ids[:-1], skip_special_tokens=True).rstrip(TORN) + completion.text


# -- best-of-N on the GSM8K and MATH-500 files ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("source, file, extra", [
    ("gsm8k", "gsm8k/test.jsonl", ["--greedy_limit", "2"]),
    ("math500", "math500/test.jsonl", []),
])
def test_best_of_n_on_real_files(source, file, extra, model, engine, tokenizer, shared_data, tmp_path):
    argv = ["--config", str(ROOT / f"configs/best_of_n/{source}.yaml"), "--model_name_or_path", model,
            "--data_path", str(shared_data / file), "--limit", "3", "--n", "4", "--max_tokens", "80",
            "--subsamples", "2", "--output_dir", str(tmp_path), *extra]
    args = parse(best_of_n.BestOfNArgs, argv, RENAMED_FIELDS)
    metrics = best_of_n.run(args, engine)
    problems = load_problems(source, "test", path=shared_data / file, limit=3)
    rows = [json.loads(line) for line in (tmp_path / "problems.jsonl").open()]
    assert [r["id"] for r in rows] == [p.id for p in problems]
    assert [r["gold"] for r in rows] == [p.answer for p in problems]  # "#### N" on GSM8K, the answer field on MATH
    samples = [s for r in rows for s in r["samples"]]
    assert all(len(r["samples"]) == 4 for r in rows)
    assert [s["answer"] for s in samples] == [extract_answer(s["text"]) for s in samples]
    assert [s["correct"] for s in samples] == grade_many([s["text"] for s in samples],
                                                         [r["gold"] for r in rows for _ in r["samples"]])
    # N = 4 uses every sample: the selectors' accuracy and pass@4 follow from the per-problem file
    for name in ("first", "majority", "max_logprob"):
        right = [r["selected"][name] is not None and r["samples"][r["selected"][name]]["correct"] for r in rows]
        assert metrics["selectors"][name]["4"]["accuracy"] == pytest.approx(sum(right) / 3)
    assert metrics["pass_at_k"]["4"] == pytest.approx(sum(any(s["correct"] for s in r["samples"]) for r in rows) / 3)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert json.loads((tmp_path / "config.json").read_text())["data_path"] == str(shared_data / file)
    assert (tmp_path / "accuracy_vs_n.png").stat().st_size > 5_000 and "| majority |" in (tmp_path / "summary.md").read_text()
    for tree in read_trees(tmp_path / "trees"):
        check_chat_prompt(tree, next(p.question for p in problems if p.id == tree.problem_id), tokenizer)
    if source == "math500":  # per-level and per-subject tables from the file's own fields
        assert metrics["groups"]["level"] and sum(g["problems"] for g in metrics["groups"]["level"].values()) == 3
        assert set(metrics["groups"]["subject"]) == {p.extra["subject"] for p in problems}
    else:  # greedy decoding of the first two problems, on the same chat prompts
        greedy = [json.loads(line) for line in (tmp_path / "greedy_samples.jsonl").open()]
        assert [g["gold"] for g in greedy] == [p.answer for p in problems[:2]]
        assert metrics["greedy"]["problems"] == 2
        assert metrics["greedy"]["accuracy"] == sum(g["correct"] for g in greedy) / 2


# -- PRM labels from the flat trees ------------------------------------------------------------------

@pytest.mark.slow
def test_prm_labels_follow_the_steps_of_the_text(flat_run, model, engine, tmp_path):
    _, _, trees_dir = flat_run
    argv = ["--model_name_or_path", model, "--trees_path", str(trees_dir / "trees"), "--step_mode", "line",
            "--k", "2", "--kind", "soft", "--truncate", "false", "--max_tokens", "48", "--output_dir", str(tmp_path)]
    metrics = prm_labels.run(parse(prm_labels.PRMLabelArgs, argv), engine)
    records = [json.loads(line) for line in (tmp_path / "labels.jsonl").open()]
    trees = list(read_trees(trees_dir / "trees"))
    leaves = {(t.prompt, tuple(split_steps(t.path_text(leaf.id), "line"))): leaf for t in trees for leaf in t.leaves()}
    assert len(leaves) == 6  # 2 problems x 3 samples, no two alike
    assert len(records) == metrics["records"] == metrics["solutions"] == sum(1 for _, steps in leaves if steps) > 0
    for record in records:
        assert record["prompt"].startswith(f"{IM_START}system") and record["prompt"].endswith(f"{IM_START}assistant\n")
        # one label per step, the steps exactly the lines of a sampled solution
        leaf = leaves[(record["prompt"], tuple(record["completions"]))]
        assert len(record["labels"]) == len(record["completions"])
        assert record["labels"][-1] == leaf.scores["outcome"]  # the last step is the solution itself
        assert all(v in (0.0, 0.5, 1.0) for v in record["labels"])  # k = 2 completions per prefix
    assert metrics["step_labels"] == sum(len(r["labels"]) for r in records)
    assert metrics["positive_share"] == pytest.approx(sum(sum(r["labels"]) for r in records) / metrics["step_labels"])
    assert json.loads((tmp_path / "config.json").read_text())["kind"] == "soft"


# -- eval_prm: SmolLM2 judging its own steps on ProcessBench -------------------------------------------

@pytest.mark.slow
def test_eval_prm_self_evaluation_on_processbench(model, engine, shared_data, tmp_path):
    files = [shared_data / "processbench/gsm8k.json", shared_data / "processbench/math.json"]
    argv = ["--model_name_or_path", model, "--scorer", "self_eval", "--processbench", ",".join(map(str, files)),
            "--limit", "2", "--thresholds", "0.25,0.5,0.75", "--output_dir", str(tmp_path)]
    metrics = eval_prm.run(parse(eval_prm.EvalPRMArgs, argv, RENAMED_FIELDS), engine)
    assert list(metrics["by_threshold"]) == ["0.25", "0.5", "0.75"]
    for cell in metrics["by_threshold"].values():
        assert set(cell["splits"]) == {"gsm8k", "math"}
        for split in cell["splits"].values():  # --limit 2: one erroneous and one correct case per file
            assert (split["erroneous"], split["correct"]) == (1, 1)
            assert split["acc_err"] in (0.0, 1.0) and split["acc_corr"] in (0.0, 1.0)
        assert cell["average_f1"] == pytest.approx(sum(s["f1"] for s in cell["splits"].values()) / 2)
    assert metrics["best_average_f1"] == max(c["average_f1"] for c in metrics["by_threshold"].values())
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert json.loads((tmp_path / "config.json").read_text())["limit"] == 2


# -- ThinkPRM and GroundedPRM data --------------------------------------------------------------------

@pytest.mark.slow
def test_think_prm_data_from_smollm2_solutions(model, engine, tmp_path):
    argv = ["--config", str(ROOT / "configs/think_prm_data/arith.yaml"), "--model_name_or_path", model, "--limit", "3",
            "--samples", "2", "--max_tokens", "64", "--balance", "false", "--output_dir", str(tmp_path)]
    args = parse(think_prm_data.ThinkPRMDataArgs, argv)
    metrics = think_prm_data.run(args, engine)
    assert metrics["solutions"] <= 6 and metrics["filter"]["candidates"] == metrics["solutions"]
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").open()]
    assert len(records) == metrics["records"] == metrics["filter"]["passed"] > 0
    problems = {p.id: p for p in load_problems("arith", "train", limit=3)}
    for record in records:
        problem = problems[record["problem_id"]]
        assert problem.question in record["prompt"] and solution_lines(record["steps"]) in record["prompt"]
        # the gold label is the exact checker's first wrong step of these very steps, and the chain
        # says "correct" up to it and "incorrect" at it
        assert record["first_error"] == check_solution(problem, "\n".join(record["steps"]))
        first = record["first_error"]
        assert record["completion"].count("\\boxed{incorrect}") == (first != -1)
        assert record["completion"].count("\\boxed{correct}") == (first if first != -1 else len(record["steps"]))
    # the verifier starts from a copy of SmolLM2 whose context was never shortened
    init = Path(metrics["init_model"])
    assert json.loads((init / "config.json").read_text())["max_position_embeddings"] == 8192
    assert json.loads((tmp_path / "config.json").read_text())["solution_prompt_style"] is None


@pytest.mark.slow
def test_grounded_prm_data_on_gsm8k(model, engine, tokenizer, shared_data, tmp_path):
    argv = ["--config", str(ROOT / "configs/grounded_prm_data/arith.yaml"), "--model_name_or_path", model,
            "--source", "gsm8k", "--data_path", str(shared_data / "gsm8k/test.jsonl"), "--limit", "2",
            "--trajectories", "4", "--segment_tokens", "24", "--max_depth", "4", "--max_tokens", "96",
            "--simulations", "0", "--grounding", "false", "--chat_records", "true", "--output_dir", str(tmp_path)]
    args = parse(grounded_prm_data.GroundedDataArgs, argv)
    metrics = grounded_prm_data.run(args, engine)
    trees = {t.problem_id: t for t in read_trees(tmp_path / "trees")}
    step_trees = [json.loads(line) for line in (tmp_path / "step_trees.jsonl").open()]
    assert metrics["problems"] == len(step_trees) == 2
    for st in step_trees:
        tree = trees[st["problem_id"]]
        nodes = st["nodes"]
        # every step node is one line of a sampled path: the step paths re-spell the segment paths
        paths = {tuple(split_steps(tree.path_text(leaf.id), "line")) for leaf in tree.leaves()}
        for node in nodes[1:]:
            assert node["text"].endswith("\n") and "\n" not in node["text"][:-1]
            assert node["scores"]["tool_check"]["verdict"] in ("correct", "incorrect", "unverifiable")
        ends = [n for n in nodes[1:] if n["finish_reason"]]
        for end in ends:
            steps, node = [], end
            while node["parent"] is not None:
                steps.append(node["text"].strip())
                node = nodes[node["parent"]]
            assert tuple(reversed(steps)) in paths
    records = [json.loads(line) for line in (tmp_path / "rationale.jsonl").open()]
    assert len(records) == metrics["records"] > 0
    for record in records:  # --chat_records: SmolLM2's chat template, the step under judgement last
        assert record["prompt"].startswith(f"{IM_START}system\n") and record["prompt"].endswith(f"{IM_START}assistant\n")
        assert f"Step {record['step'] + 1}:" in record["prompt"]
        assert record["label"] == ("+" if record["value"] > 0 else "-")
    assert json.loads((tmp_path / "metrics.json").read_text())["records"] == len(records)


# -- fast: what these runs led to -------------------------------------------------------------------

def test_chat_style_without_a_chat_template_names_the_fix(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy())
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"tokenizer of .*tiny_policy has no chat template.*--prompt_style plain"):
        PromptTemplate(style="chat").render("1+1?", tokenizer)
    args = EngineArgs(model_name_or_path="some/base-model", prompt_style="chat")
    with pytest.raises(ValueError, match="no chat template"):  # before any sampling
        args.prompt_template(tokenizer)
    assert EngineArgs(model_name_or_path="some/base-model").prompt_template(tokenizer).style == "plain"


def test_continuation_text_after_a_torn_character():
    tokenizer = qwen_tokenizer()  # a real byte-level BPE: the emoji takes more than one token
    ids = tokenizer("x = 🐍 done", add_special_tokens=False)["input_ids"]
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith(TORN))
    prompt, new = ids[:cut], ids[cut:]
    vllm_text = tokenizer.decode(ids)  # what vLLM returned there: the prompt's text in front
    assert continuation_text(tokenizer, prompt, new, vllm_text) == "🐍 done"
    assert continuation_text(tokenizer, prompt, new, vllm_text, stop=[" done"]) == "🐍"
    assert continuation_text(tokenizer, prompt, new, vllm_text, stop=[" done"], include_stop=True) == "🐍 done"
    # a whole character at the prompt's end: the engine's text is kept as it is
    assert continuation_text(tokenizer, ids[:1], ids[1:], "as given") == "as given"
    # a completion that itself stops inside a character leaves it to the next one
    first = next(k for k in range(cut + 1, len(ids)) if not tokenizer.decode(ids[:k]).endswith(TORN))
    assert first - cut > 1 and continuation_text(tokenizer, prompt, ids[cut:first - 1], "") == ""


def test_eval_prm_limit_keeps_both_kinds_of_case():
    rows = [{"label": label} for label in (0, 2, 1, 3, -1, -1, -1)]
    assert eval_prm.balanced_head(rows, None) == rows
    assert [r["label"] for r in eval_prm.balanced_head(rows, 4)] == [0, 2, -1, -1]
    assert [r["label"] for r in eval_prm.balanced_head(rows, 3)] == [0, 2, -1]
    assert [r["label"] for r in eval_prm.balanced_head(rows[:4], 3)] == [0, 2, 1]  # no correct case: all erroneous


def test_mc_prefixes_follow_the_text_as_written():
    """Prose solutions indent and leave blank lines; a step prefix is the text through that step as
    written, so the tree's other trajectories that continue it are found (and top-ups continue it)."""
    text = "First:\n  3 + 4 = 7\n\n  7 - 4 = 3\nThe answer is 3"
    steps = split_steps(text, "line")
    assert steps == ["First:", "3 + 4 = 7", "7 - 4 = 3", "The answer is 3"]
    assert [text[:end] for end in step_ends(text, steps)] == [
        "First:\n  ", "First:\n  3 + 4 = 7\n\n  ", "First:\n  3 + 4 = 7\n\n  7 - 4 = 3\n", text]
    tree = ReasoningTree(problem_id="p", prompt="Q\n", prompt_ids=[1], answer="3")
    for solution, ok in [(text, 1.0), (text.replace("is 3", "is 4"), 0.0),
                         (text.replace("7 - 4 = 3\nThe answer is 3", "7 + 1 = 8\nThe answer is 8"), 0.0),
                         (text.replace("7 - 4 = 3", "7 + 1 = 8"), 1.0)]:
        tree.add(0, solution, [1], [-0.1], "eos", outcome=ok)
    with Grader() as grader:  # every prefix is continued by another trajectory: no engine is needed
        solutions = mc_estimate([tree], engine=None, grader=grader, k=1)
    assert [s.values for s in solutions] == [[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0],
                                             [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]]
