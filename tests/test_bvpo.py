"""BVPO: the mixed loss is the weighted sum of the two DPO losses (checked against log-probs taken by
hand), the closed-form alpha and its estimate on synthetic gradients with known statistics, the pair
record and the empty-think rendering, the data builder on the dual-mode tiny policy in both modes
(and its resume), and a short real training run with alpha auto."""

from __future__ import annotations

import json
import math

import pytest
import torch
from treetune.data import DataError, PromptTemplate
from treetune.data.arith import arith_problems
from treetune.data.bvpo_pairs import EMPTY_THINK, BVPOPair, load_bvpo_pairs, mode_prompt, write_bvpo_pairs
from treetune.trainers.bvpo.alpha import AlphaEstimator, GradientSketch, closed_form_alpha, estimate_alpha, mixture_mse


def arith_pairs(count: int, offset: int = 0) -> list[BVPOPair]:
    """Both modes per problem, gold against an answer off by one: pairs with a known preference."""
    pairs = []
    for p in arith_problems("train", limit=count + offset)[offset:]:
        wrong = str(int(p.answer) + 1)
        head = p.solution.rsplit("\n", 1)[0]
        pairs.append(BVPOPair(prompt=p.question, chosen=p.solution, rejected=f"{head}\nThe answer is \\boxed{{{wrong}}}",
                              mode="trace", problem_id=p.id, answer=p.answer))
        pairs.append(BVPOPair(prompt=p.question, chosen=f"The answer is \\boxed{{{p.answer}}}",
                              rejected=f"The answer is \\boxed{{{wrong}}}", mode="empty", problem_id=p.id, answer=p.answer))
    return pairs


# ---------------------------------------------------------------- the mixed loss

def test_mixed_loss_is_the_weighted_sum_of_the_two_dpo_losses(tmp_path, tiny_policy_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treetune.trainers.bvpo.config import BVPOConfig
    from treetune.trainers.bvpo.trainer import BVPOTrainer, build_bvpo_dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_path)
    pairs = arith_pairs(4)
    trace, empty = [p for p in pairs if p.mode == "trace"], [p for p in pairs if p.mode == "empty"]
    dataset, report = build_bvpo_dataset(trace, empty, tokenizer, "bare", 256, 192)
    assert report["matched_same_problem"] == 4 and report["rows"] == 4
    beta, alpha = 0.3, 0.3
    config = BVPOConfig(output_dir=str(tmp_path), bvpo_alpha=str(alpha), beta=beta, per_device_train_batch_size=4,
                        report_to=[], bf16=False, max_length=256)
    trainer = BVPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_policy_path), args=config,
                          train_dataset=dataset, processing_class=tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference, so the losses are not all log 2
        for param in trainer.model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    trainer.model.train()
    mixed = float(trainer.compute_loss(trainer.model, batch).detach())

    reference = AutoModelForCausalLM.from_pretrained(tiny_policy_path)

    def logp(model, prompt: str, response: str) -> float:
        p_ids = tokenizer(prompt)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([p_ids + r_ids])).logits[0, len(p_ids) - 1:-1].float()
        return float(torch.log_softmax(logits, -1)[torch.arange(len(r_ids)), torch.tensor(r_ids)].sum())

    def dpo_loss(group: list[BVPOPair]) -> float:
        total = 0.0
        for pair in group:
            prompt = mode_prompt(pair.prompt, pair.mode, PromptTemplate(style="bare"))
            margin = (logp(trainer.model, prompt, pair.chosen) - logp(reference, prompt, pair.chosen)) - \
                     (logp(trainer.model, prompt, pair.rejected) - logp(reference, prompt, pair.rejected))
            total += math.log1p(math.exp(-beta * margin))
        return total / len(group)

    loss_t, loss_e = dpo_loss(trace), dpo_loss(empty)
    assert abs(loss_t - loss_e) > 1e-3 and abs(loss_t - math.log(2)) > 1e-3  # a test that can fail
    assert mixed == pytest.approx(alpha * loss_t + (1 - alpha) * loss_e, abs=1e-4)
    logged = trainer._metrics["train"]
    assert logged["trace/loss"][-1] == pytest.approx(loss_t, abs=1e-4)
    assert logged["empty/loss"][-1] == pytest.approx(loss_e, abs=1e-4)
    assert logged["bvpo/alpha"][-1] == alpha and "rewards/chosen" not in logged  # filed per estimator


def test_alpha_one_is_trace_only_dpo_and_alpha_is_validated(tmp_path, tiny_policy_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treetune.trainers.bvpo.config import BVPOConfig, parse_alpha
    from treetune.trainers.bvpo.trainer import BVPOTrainer, build_bvpo_dataset, match_pairs

    assert parse_alpha("auto") is None and parse_alpha("0.25") == 0.25
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        parse_alpha("1.5")
    with pytest.raises(ValueError, match="auto"):
        BVPOConfig(output_dir="/tmp/x", bvpo_alpha="half", report_to=[], bf16=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_path)
    pairs = arith_pairs(3)
    trace = [p for p in pairs if p.mode == "trace"]
    dataset, _ = build_bvpo_dataset(trace, [], tokenizer, "bare", 256, None)
    assert "empty_prompt_ids" not in dataset.column_names
    # trace pairs without an empty pair of their own problem take unused ones, cycled
    empty = [p for p in arith_pairs(2, offset=5) if p.mode == "empty"]
    matches, report = match_pairs(trace, empty, seed=0)
    assert [i for i, _ in matches] == [0, 1, 2] and sorted({j for _, j in matches}) == [0, 1]
    assert report == {"matched_same_problem": 0, "empty_pairs_unused": 0}
    # alpha 1: the loss is the trace DPO loss alone and the empty batch is never run
    both, _ = build_bvpo_dataset(trace, [p for p in pairs if p.mode == "empty"], tokenizer, "bare", 256, None)
    config = BVPOConfig(output_dir=str(tmp_path), bvpo_alpha="1", per_device_train_batch_size=3, report_to=[], bf16=False)
    trainer = BVPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_policy_path), args=config,
                          train_dataset=both, processing_class=tokenizer)
    trainer.model.train()
    loss = float(trainer.compute_loss(trainer.model, trainer.data_collator([both[i] for i in range(3)])).detach())
    logged = trainer._metrics["train"]
    assert loss == pytest.approx(logged["trace/loss"][-1]) and "empty/loss" not in logged


# ---------------------------------------------------------------- alpha

def test_closed_form_alpha_minimises_the_mixture_mse():
    torch.manual_seed(0)
    for _ in range(20):
        b_t, b_e = torch.randn(5) * torch.rand(1), torch.randn(5) * 2 * torch.rand(1)
        t_t, t_e = float(torch.rand(1) * 5), float(torch.rand(1) * 5)
        t_te = float((torch.rand(1) * 2 - 1) * math.sqrt(t_t * t_e))  # |tr S_te| <= sqrt(tr S_t tr S_e) here
        alpha = closed_form_alpha(t_t, t_e, t_te, b_t, b_e)
        grid = [i / 1000 for i in range(1001)]
        best = min(grid, key=lambda a: mixture_mse(a, t_t, t_e, t_te, b_t, b_e))
        assert alpha == pytest.approx(best, abs=2e-3)
        assert mixture_mse(alpha, t_t, t_e, t_te, b_t, b_e) <= min(
            mixture_mse(0.0, t_t, t_e, t_te, b_t, b_e), mixture_mse(1.0, t_t, t_e, t_te, b_t, b_e)) + 1e-9


@pytest.mark.parametrize("sigma_t,sigma_e,rho,bias", [(2.0, 0.5, 0.3, 0.1), (1.0, 1.0, 0.0, 0.0), (0.5, 1.5, -0.2, 0.05)])
def test_auto_alpha_recovers_the_optimum_from_synthetic_gradients(sigma_t, sigma_e, rho, bias):
    """g_t ~ N(mu, s_t^2 I), g_e = mu + b + correlated noise: a* is known in closed form."""
    d, n = 64, 4000
    generator = torch.Generator().manual_seed(1)
    mu = torch.randn(d, generator=generator)
    b = bias * torch.randn(d, generator=generator)
    z1, z2 = torch.randn(n, d, generator=generator), torch.randn(n, d, generator=generator)
    g_t = mu + sigma_t * z1
    g_e = mu + b + sigma_e * (rho * z1 + math.sqrt(1 - rho**2) * z2)
    tr_t, tr_e, tr_te = d * sigma_t**2, d * sigma_e**2, d * rho * sigma_t * sigma_e
    truth = closed_form_alpha(tr_t, tr_e, tr_te, torch.zeros(d), b)
    alpha, stats = estimate_alpha(g_t, g_e)
    assert stats["trace_t"] == pytest.approx(tr_t, rel=0.05) and stats["trace_e"] == pytest.approx(tr_e, rel=0.05)
    assert stats["bias_sq"] == pytest.approx(float(b @ b), abs=0.05 * (tr_t + tr_e) / 10 + 0.02)
    assert alpha == pytest.approx(truth, abs=0.03)
    # the running estimator over a window sees the same optimum from the last rows
    running = AlphaEstimator(window=300, min_samples=4)
    assert running.update(g_t[0], g_e[0]) == 0.5  # fallback before min_samples
    for i in range(1, 400):
        running.update(g_t[i], g_e[i])
    assert len(running.rows) == 300
    assert running.alpha == pytest.approx(estimate_alpha(g_t[100:400], g_e[100:400])[0], abs=1e-6)
    assert running.alpha == pytest.approx(truth, abs=0.1)
    # a low-dimensional coordinate sketch keeps the ratio (common scale cancels)
    params = [torch.nn.Parameter(torch.zeros(d // 2)), torch.nn.Parameter(torch.zeros(d // 2))]
    sketch = GradientSketch(params, dim=48, seed=0)
    rows_t = torch.stack([sketch([g[: d // 2], g[d // 2:]], params) for g in g_t])
    rows_e = torch.stack([sketch([g[: d // 2], g[d // 2:]], params) for g in g_e])
    assert rows_t.shape == (n, 48)
    assert estimate_alpha(rows_t, rows_e)[0] == pytest.approx(truth, abs=0.1)


# ---------------------------------------------------------------- records and rendering

def test_pair_records_load_with_errors_naming_file_line_and_field(tmp_path):
    good = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "mode": "empty"}
    path = tmp_path / "pairs.jsonl"
    rows = [good, {**good, "mode": "thinking"}, {k: v for k, v in good.items() if k != "mode"},
            {**good, "chosen": [{"role": "assistant", "content": "four"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as err:
        load_bvpo_pairs(str(path))
    assert f"{path}:2" in str(err.value) and "'mode'" in str(err.value)
    pairs, report = load_bvpo_pairs(str(path), skip_bad=True)
    assert [p.chosen for p in pairs] == ["4", "four"] and len(report) == 2
    assert "field 'mode': missing" in report.summary()
    trace_file = tmp_path / "trace.jsonl"
    trace_file.write_text(json.dumps({k: v for k, v in good.items() if k != "mode"}) + "\n")
    (pair,), _ = load_bvpo_pairs(str(trace_file), mode="trace")
    assert pair.mode == "trace"
    with pytest.raises(DataError, match="file not found"):
        load_bvpo_pairs(str(tmp_path / "missing.jsonl"))


def test_empty_think_rendering_uses_the_template_where_it_can(tiny_policy_path):
    from transformers import AutoTokenizer

    bare = PromptTemplate(style="bare")
    assert mode_prompt("Q", "trace", bare) == "Q\n"
    assert mode_prompt("Q", "empty", bare) == "Q\n" + EMPTY_THINK
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_path)
    chat = PromptTemplate(style="chat", instruction="")
    # an R1-distill-like template that opens the think block itself: it is closed, not opened twice
    tokenizer.chat_template = "{% for m in messages %}<|User|>{{ m['content'] }}{% endfor %}{{ '<|Assistant|><think>\\n' }}"
    assert mode_prompt("Q", "trace", chat, tokenizer) == "<|User|>Q<|Assistant|><think>\n"
    assert mode_prompt("Q", "empty", chat, tokenizer) == "<|User|>Q<|Assistant|><think>\n\n</think>\n\n"
    # a Qwen3-like template with its own enable_thinking switch: its rendering is used as is
    tokenizer.chat_template = ("{% for m in messages %}<u>{{ m['content'] }}{% endfor %}<a>"
                               "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}")
    assert mode_prompt("Q", "trace", chat, tokenizer) == "<u>Q<a>"
    assert mode_prompt("Q", "empty", chat, tokenizer) == "<u>Q<a><think>\n\n</think>\n\n"
    with pytest.raises(ValueError, match="mode"):
        mode_prompt("Q", "off", bare)


# ---------------------------------------------------------------- data builder and training

@pytest.fixture(scope="module")
def dual_policy() -> str:
    from treetune.data.arith import dual_mode_policy

    return dual_mode_policy(quiet=True)


@pytest.mark.slow
def test_data_builder_on_the_dual_mode_policy_makes_pairs_in_both_modes_and_resumes(tmp_path, dual_policy):
    from treetune.rewards.grading import Grader
    from treetune.rollouts.engines import VLLMEngine
    from treetune.launch.bvpo_data import BVPODataArgs
    from treetune.trainers.bvpo.pairs import build_bvpo_pairs, response_scorer

    problems = arith_problems("train", limit=12)
    args = BVPODataArgs(output_dir=str(tmp_path / "pairs"), samples=6, temperature=1.0, max_tokens=96,
                        batch_problems=4)
    out = args.output_dir
    with Grader(processes=1) as grader, VLLMEngine(dual_policy, kv_cache_gb=0.25) as engine:
        scorer = response_scorer(args.scorer, args.scorer_format, grader)
        summary = build_bvpo_pairs(out, engine, engine.tokenizer, problems[:8], PromptTemplate(style="bare"), scorer,
                                   args, args, batch_problems=args.batch_problems)
        for mode in ("trace", "empty"):
            assert summary[mode]["pairs"] >= 1, summary
            assert summary[mode]["pairs"] + sum(summary[mode]["why_no_pairs"].values()) == 8
        pairs, _ = load_bvpo_pairs(summary["pairs_file"])
        for pair in pairs:
            assert grader.grade(pair.chosen, pair.answer) and not grader.grade(pair.rejected, pair.answer)
        empty = [p for p in pairs if p.mode == "empty"]
        trace = [p for p in pairs if p.mode == "trace"]
        # answer-only responses against worked solutions: the policy really answers in the two modes
        assert all("=" not in p.chosen for p in empty) and all("=" in p.chosen for p in trace)
        # a killed run: a pair without its status line is dropped; then the run resumes with 4 more problems
        with open(summary["pairs_file"], "a") as handle:
            handle.write(BVPOPair(prompt="Q", chosen="a", rejected="b", mode="trace", problem_id=problems[9].id).to_json() + "\n")
        again = build_bvpo_pairs(out, engine, engine.tokenizer, problems, PromptTemplate(style="bare"), scorer,
                                 args, args, batch_problems=args.batch_problems)
    lines = [json.loads(l) for l in open(again["pairs_file"])]
    keys = [(l["problem_id"], l["mode"]) for l in lines]
    assert len(keys) == len(set(keys)) and "Q" not in [l["prompt"] for l in lines]
    assert {(l["problem_id"], l["mode"]) for l in lines if l["problem_id"] in {p.id for p in problems[:8]}} == \
        {(p.problem_id, p.mode) for p in pairs}  # the first 8 problems were not sampled again
    assert again["trace"]["pairs"] + sum(again["trace"]["why_no_pairs"].values()) == 12


@pytest.mark.slow
def test_training_with_auto_alpha_logs_alpha_and_lowers_both_losses(tmp_path, tiny_policy_path):
    from treetune.trainers.bvpo.trainer import main

    pairs_path = tmp_path / "pairs.jsonl"
    write_bvpo_pairs(arith_pairs(32), pairs_path)
    out = tmp_path / "run"
    main(["--pairs", str(pairs_path), "--output_dir", str(out), "--beta", "0.5", "--learning_rate", "1e-4",
          "--per_device_train_batch_size", "8", "--max_length", "128", "--logging_steps", "1", "--report_to", "none",
          "--save_strategy", "no", "--lr_scheduler_type", "constant", "--seed", "0", "--disable_tqdm", "true",
          "--max_steps", "12", "--bvpo_alpha", "auto", "--bvpo_alpha_min_samples", "3", "--bvpo_sketch_dim", "4096"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["rows"] == 32 and metrics["matched_same_problem"] == 32
    alphas = metrics["alpha_history"]
    assert len(alphas) == 12 and alphas[:2] == [0.5, 0.5] and all(0.0 <= a <= 1.0 for a in alphas)
    assert any(a != 0.5 for a in alphas[2:])  # estimated from step 3 on
    assert metrics["trace_loss_history"][0] == pytest.approx(math.log(2), abs=0.01)
    assert metrics["trace_loss_history"][-1] < math.log(2) - 0.02
    assert metrics["empty_loss_history"][-1] < math.log(2) - 0.02
    assert (out / "model.safetensors").exists()


def test_reward_model_and_verifier_scorers_rank_responses(tmp_path, tiny_policy_path):
    """Any scorer plugs into the builder: a (randomly initialised, tiny) sequence-classification reward
    model scores deterministically, one score per response; the exact arith checker prefers the gold solution."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification
    from treetune.launch.bvpo_data import RENAMED, BVPODataArgs
    from treetune.trainers.bvpo.pairs import final_part, pick_pair, response_scorer
    from treetune.trainers.common import parse_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_path)
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                       num_labels=1, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    problems = arith_problems("train", limit=2)
    responses = [problems[0].solution, "The answer is \\boxed{0}", problems[1].solution]
    rm = response_scorer(str(tmp_path / "rm"), "reward_model")
    # the old spelling, --scorer reward_model --scorer_path PATH, still reaches the same scorer (with a warning)
    with pytest.warns(FutureWarning, match="scorer_format reward_model"):
        (old,) = parse_config((BVPODataArgs,), ["--scorer", "reward_model", "--scorer_path", str(tmp_path / "rm")],
                              renamed=RENAMED)
    assert (old.scorer, old.scorer_format) == (str(tmp_path / "rm"), "reward_model")
    scores = rm.score([problems[0], problems[0], problems[1]], responses)
    assert len(scores) == 3 and len(set(scores)) == 3
    assert rm.score([problems[0]], responses[:1])[0] == pytest.approx(scores[0], abs=1e-5)  # padding does not matter
    checker = response_scorer("arith_checker")
    trace = "<think>\nscratch\n</think>\n\n" + problems[0].solution  # only the part after the trace is judged
    assert final_part(trace) == "\n\n" + problems[0].solution
    assert checker.score([problems[0]] * 2, [trace, responses[1]]) == [1.0, 0.0]
    assert pick_pair([1.0, 0.0, 1.0], ["a", "b", "c"], 1e-6) == (0, 1)
    assert pick_pair([0.0, 0.0], ["a", "b"], 1e-6).startswith("no spread")
