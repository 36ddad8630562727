"""BVPO on the proving ground: the dual-mode tiny policy (steps, and answer-only after an empty think
block) makes its own pairs in both modes (best vs worst of 5 by the gold answer); then

- gradient variance: on the same batches at the starting weights, the trace-only DPO gradient g_t
  against the mixed g_c = a g_t + (1 - a) g_e (a = 0.5, and the closed-form a estimated from those
  batches): total variance tr Cov over batches, and the MSE against the mean trace gradient;
- greedy accuracy in both modes on 500 arith test problems: at the start, after DPO on the trace
  pairs alone (bvpo_alpha 1: the same batches, the empty half unused), after BVPO with a = 0.5 and
  after BVPO with a = auto.

    python benchmarks/bvpo_arith.py --output bvpo_arith.json [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def train_args(out: Path, pairs: str, a, alpha: str) -> list[str]:
    return ["--pairs", pairs, "--output_dir", str(out), "--bvpo_alpha", alpha, "--beta", str(a.beta),
            "--learning_rate", str(a.learning_rate), "--num_train_epochs", str(a.epochs),
            "--per_device_train_batch_size", str(a.batch_size), "--max_length", "256", "--max_prompt_length", "192",
            "--logging_steps", "5", "--report_to", "none", "--save_strategy", "no", "--lr_scheduler_type", "cosine",
            "--warmup_steps", "0.1", "--seed", "0", "--disable_tqdm", "true"]


def greedy_both_modes(model: str, problems) -> dict:
    """Greedy accuracy with steps (the trace prompt) and answer-only (the empty-think prompt)."""
    from treetune.data.bvpo_pairs import ModeTemplate
    from treetune.rewards.evaluation.greedy import greedy_eval
    from treetune.rewards.grading import Grader
    from treetune.rollouts.engines import VLLMEngine

    out = {}
    with Grader() as grader, VLLMEngine(model) as engine:
        for mode in ("trace", "empty"):
            metrics, _ = greedy_eval(engine, engine.tokenizer, problems, ModeTemplate(style="bare", mode=mode),
                                     max_tokens=128, grader=grader, progress=False)
            keep = ("accuracy", "mean_tokens", "truncated") + (("all_steps_right",) if mode == "trace" else ())
            out[mode] = {k: round(metrics[k], 4) for k in keep if k in metrics}
    return out


def gradient_variance(policy: str, pairs_file: str, a) -> dict:
    """Variance of the trace-only and mixed gradient estimates over the same training batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treetune.data.bvpo_pairs import load_bvpo_pairs
    from treetune.trainers.bvpo.alpha import estimate_alpha, gradient_statistics
    from treetune.trainers.bvpo.trainer import BVPOConfig, BVPOTrainer, build_bvpo_dataset

    pairs, _ = load_bvpo_pairs(pairs_file)
    trace, empty = [p for p in pairs if p.mode == "trace"], [p for p in pairs if p.mode == "empty"]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    dataset, _ = build_bvpo_dataset(trace, empty, tokenizer, "bare", 256, 192)
    config = BVPOConfig(output_dir=tempfile.mkdtemp(prefix="bvpo_grad_"), beta=a.beta, per_device_train_batch_size=a.batch_size,
                        report_to=[], bf16=False, max_length=256, seed=0, disable_tqdm=True)
    trainer = BVPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy), args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    started = time.perf_counter()
    g_t, g_e = trainer.per_batch_gradients(a.variance_batches)  # whole gradients: the model is small
    g_t, g_e = g_t.double(), g_e.double()
    seconds = time.perf_counter() - started
    stats = gradient_statistics(g_t, g_e)
    alpha_auto, _ = estimate_alpha(g_t, g_e)
    target = g_t.mean(0)  # the stand-in for the true gradient that `auto` also uses

    def spread(alpha: float) -> dict:
        rows = alpha * g_t + (1 - alpha) * g_e
        centred = rows - rows.mean(0)
        variance = float((centred * centred).sum()) / (len(rows) - 1)
        mse = float(((rows - target) ** 2).sum(1).mean())
        return {"alpha": round(alpha, 4), "total_variance": variance, "mse_vs_mean_trace_gradient": mse}

    trace_only, mixed_half, mixed_auto = spread(1.0), spread(0.5), spread(alpha_auto)
    return {
        "batches": len(g_t), "batch_size": a.batch_size, "parameters": g_t.shape[1], "seconds": round(seconds, 1),
        "trace_only": trace_only, "mixed_alpha_0.5": mixed_half, "mixed_alpha_auto": mixed_auto,
        "variance_ratio_mixed_0.5_over_trace": mixed_half["total_variance"] / trace_only["total_variance"],
        "variance_ratio_mixed_auto_over_trace": mixed_auto["total_variance"] / trace_only["total_variance"],
        "components": {"tr_cov_trace": stats["trace_t"], "tr_cov_empty": stats["trace_e"],
                       "tr_cross_cov": stats["trace_te"], "bias_sq_empty_vs_trace": stats["bias_sq"],
                       "mean_sq_norm_trace": float((g_t * g_t).sum(1).mean()),
                       "mean_sq_norm_empty": float((g_e * g_e).sum(1).mean())},
        "alpha_squared_times_trace_variance_at_0.5": 0.25 * stats["trace_t"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--train_problems", type=int, default=1000)
    parser.add_argument("--eval_problems", type=int, default=500)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the pair data")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--learning_rate", type=float, default=5e-6)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--variance_batches", type=int, default=40)
    parser.add_argument("--skip_auto", action="store_true", help="leave out the bvpo_alpha auto training run")
    a = parser.parse_args()

    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import dual_mode_policy, policy_build
    from treetune.rewards.grading import Grader
    from treetune.rollouts.engines import VLLMEngine
    from treetune.launch.bvpo_data import BVPODataArgs
    from treetune.trainers.bvpo.pairs import build_bvpo_pairs, response_scorer
    from treetune.trainers.bvpo.trainer import main as bvpo

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bvpo_arith_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"settings": vars(a)}
    started = time.perf_counter()
    policy = dual_mode_policy()
    result["policy"] = {"path": policy, "build": policy_build(policy)["build"], "seconds": round(time.perf_counter() - started, 1)}

    data_args = BVPODataArgs(output_dir=str(work / "pairs"), limit=a.train_problems, samples=a.samples, temperature=a.temperature,
                             max_tokens=128, empty_max_tokens=32, batch_problems=128)
    started = time.perf_counter()
    with Grader() as grader, VLLMEngine(policy) as engine:
        result["pairs"] = build_bvpo_pairs(data_args.output_dir, engine, engine.tokenizer,
                                           load_problems("arith", "train", limit=a.train_problems),
                                           PromptTemplate(style="bare"), response_scorer(data_args.scorer, grader=grader),
                                           data_args, data_args, batch_problems=data_args.batch_problems)
    result["pairs"]["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result["pairs"], indent=2), flush=True)
    pairs_file = result["pairs"]["pairs_file"]

    result["gradient_variance"] = gradient_variance(policy, pairs_file, a)
    print(json.dumps(result["gradient_variance"], indent=2), flush=True)

    test = load_problems("arith", "test", limit=a.eval_problems)
    result["greedy_start"] = greedy_both_modes(policy, test)
    print(json.dumps(result["greedy_start"], indent=2), flush=True)

    runs = [("dpo_trace_only", "1"), ("bvpo_alpha_0.5", "0.5")] + ([] if a.skip_auto else [("bvpo_alpha_auto", "auto")])
    for name, alpha in runs:
        started = time.perf_counter()
        out = bvpo(train_args(work / name, pairs_file, a, alpha))
        metrics = json.loads((out / "metrics.json").read_text())
        alphas = metrics["alpha_history"]
        result[name] = {"greedy_after": greedy_both_modes(str(out), test), "steps": metrics["steps"],
                        "train_seconds": round(metrics["train_runtime"], 1),
                        "seconds": round(time.perf_counter() - started, 1),
                        "trace_loss_first_last": [metrics["trace_loss_history"][0], metrics["trace_loss_history"][-1]],
                        "empty_loss_first_last": ([metrics["empty_loss_history"][0], metrics["empty_loss_history"][-1]]
                                                  if metrics["empty_loss_history"] else None),
                        "alpha_mean": sum(alphas) / len(alphas) if alphas else None,
                        "alpha_last": alphas[-1] if alphas else None}
        print(name, json.dumps(result[name], indent=2), flush=True)
    start = result["greedy_start"]
    result["gain_points"] = {name: {mode: round(100 * (result[name]["greedy_after"][mode]["accuracy"] - start[mode]["accuracy"]), 1)
                                    for mode in ("trace", "empty")} for name, _ in runs}
    Path(a.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
