"""The real-model ground measured: SmolLM2-135M-Instruct (treetune.data.pretrained.smollm2) on GSM8K
and arith, sampling throughput by engine and dtype, and the effect of one offline method.

    python benchmarks/real_model.py --output real_model.json [--stages throughput,gsm8k,arith,step_dpo]
        [--gsm8k_path ../shared/data/gsm8k/test.jsonl] [--gsm8k_problems 200] [--arith_problems 500] [--n 8]

Stages (each one's figures and wall time land in the JSON as it finishes; rerun the same command
to resume with the stages not yet done):
- throughput: the same 32 GSM8K prompts (chat template), greedy, 256 tokens, decoded by vLLM in
  float32, vLLM in bfloat16, and the transformers engine (8 of the prompts, 128 tokens): tokens/s.
- gsm8k / arith: best-of-N as a user runs it (`launch/best_of_n.py`): greedy, maj@N and pass@N.
- step_dpo: SFT then Step-DPO on arith, every step a launch script run as a user runs it: SmolLM2
  writes prose that the exact step checker cannot read, so `launch/sft.py` first teaches it arith's
  one-equation-a-line format (chat template), then `launch/step_dpo_data.py` builds pairs from the
  SFT policy's own samples (first wrong step by the checker) and `launch/step_dpo.py` trains on them;
  greedy accuracy on the arith test problems after each model, and every sub-stage's wall time.
No accuracy target is set for so small a model; the targets are that every stage finishes and the
numbers are honest. Time it on a quiet machine: two CPU-bound jobs slow each other several-fold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

THROUGHPUT_ARMS = (("vllm", "float32"), ("vllm", "bfloat16"), ("hf", "float32"))


def gsm8k_prompts(path: str | None, tokenizer, count: int) -> list[list[int]]:
    from treetune.data import PromptTemplate, load_problems

    template = PromptTemplate(style="chat")
    return [template.render_ids(p.question, tokenizer) for p in load_problems("gsm8k", "test", path=path, limit=count)]


def throughput_one(engine_name: str, dtype: str, gsm8k_path: str | None) -> dict:
    """Decode the throughput prompts with one engine in this process and time it."""
    from treetune.data.pretrained import smollm2
    from treetune.rollouts.engines import GenerationRequest, HFEngine, SamplingSettings, VLLMEngine

    model = smollm2()
    started = time.time()
    engine = VLLMEngine(model, dtype=dtype) if engine_name == "vllm" else HFEngine(model, dtype=dtype)
    load = time.time() - started
    count, tokens = (32, 256) if engine_name == "vllm" else (8, 128)
    requests = [GenerationRequest(ids, SamplingSettings(temperature=0.0, max_tokens=tokens))
                for ids in gsm8k_prompts(gsm8k_path, engine.tokenizer, count)]
    engine.generate(requests[:2])  # warm-up
    started = time.time()
    results = engine.generate(requests)
    seconds = time.time() - started
    decoded = sum(len(r.completions[0].token_ids) for r in results)
    if hasattr(engine, "close"):
        engine.close()
    return {"engine": engine_name, "dtype": dtype, "prompts": count, "max_tokens": tokens, "load_seconds": round(load, 1),
            "decoded_tokens": decoded, "seconds": round(seconds, 2), "tokens_per_second": round(decoded / seconds, 1)}


def throughput(args) -> dict:
    """Each arm in a child process of its own, so no engine's threads or memory linger into the next."""
    arms = {}
    for engine_name, dtype in THROUGHPUT_ARMS:
        out = Path(args.work) / f"throughput-{engine_name}-{dtype}.json"
        subprocess.run([sys.executable, __file__, "--throughput_one", f"{engine_name}:{dtype}", "--output", str(out),
                        *(["--gsm8k_path", args.gsm8k_path] if args.gsm8k_path else [])], check=True)
        arms[f"{engine_name}_{dtype}"] = json.loads(out.read_text())
    fp32, bf16 = arms["vllm_float32"]["tokens_per_second"], arms["vllm_bfloat16"]["tokens_per_second"]
    return {"arms": arms, "vllm_float32_over_bfloat16": round(fp32 / bf16, 2)}


def best_of_n(args, source: str, problems: int, data_path: str | None) -> dict:
    from treetune.data.pretrained import smollm2
    from treetune.launch import best_of_n as job

    job_args = job.BestOfNArgs(output_dir=str(Path(args.work) / f"best_of_n-{source}"), model_name_or_path=smollm2(),
                               source=source, split="test", data_path=data_path, limit=problems, n=args.n,
                               max_tokens=args.max_tokens, greedy_limit=problems, prompt_style="chat")
    metrics = job.run(job_args)
    return {"problems": problems, "n": args.n, "max_tokens": args.max_tokens, "greedy": metrics.get("greedy"),
            "at_n": {k: v for k, v in metrics.items() if k != "greedy"}}


def launch(job: str, *argv: str) -> float:
    """Run `launch/<job>.py` as a user would, in a child process; returns its wall seconds."""
    started = time.time()
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "launch" / f"{job}.py"), *argv], check=True)
    return round(time.time() - started, 1)


def greedy(model: str, out: Path, problems: int, max_tokens: int) -> tuple[float, float]:
    """Greedy accuracy on the first `problems` arith test problems (chat template), written to `out`
    (reused when there); (accuracy, seconds)."""
    from treetune.data import PromptTemplate, load_problems
    from treetune.rewards.evaluation.greedy import greedy_eval, write_eval
    from treetune.rewards.grading import Grader
    from treetune.rollouts.engines import VLLMEngine

    done = out / "greedy_metrics.json"
    if not done.exists():
        started = time.time()
        with VLLMEngine(model) as engine, Grader() as grader:
            metrics, rows = greedy_eval(engine, engine.tokenizer, load_problems("arith", "test", limit=problems),
                                        PromptTemplate(style="chat"), max_tokens=max_tokens, grader=grader)
        metrics["seconds"] = round(time.time() - started, 1)
        write_eval(out, metrics, rows)
    metrics = json.loads(done.read_text())
    return metrics["accuracy"], metrics.get("seconds")


def step_dpo(args) -> dict:
    """SFT on arith, then Step-DPO from the SFT policy's own samples; greedy after each."""
    from treetune.data.pretrained import smollm2

    work = Path(args.work) / "step_dpo"
    base = smollm2()
    sft_dir, pairs_dir, dpo_dir = work / "sft", work / "pairs", work / "step_dpo"
    times, accuracy = {}, {}
    accuracy["start"], times["eval_start"] = greedy(base, work / "eval_start", args.arith_problems, args.arith_max_tokens)
    if not (sft_dir / "metrics.json").exists():
        times["sft"] = launch("sft", "--model_name_or_path", base, "--source", "arith", "--split", "train",
                              "--limit", str(args.sft_rows), "--prompt_style", "chat", "--output_dir", str(sft_dir),
                              "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
                              "--learning_rate", "5e-5", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
                              "--max_length", "256", "--logging_steps", "10", "--save_strategy", "no",
                              "--report_to", "none", "--seed", "0")
    accuracy["sft"], times["eval_sft"] = greedy(str(sft_dir), work / "eval_sft", args.arith_problems, args.arith_max_tokens)
    if not (pairs_dir / "metrics.json").exists():
        times["pairs"] = launch("step_dpo_data", "--config", "configs/step_dpo_data/arith.yaml",
                                "--model_name_or_path", str(sft_dir), "--prompt_style", "chat",
                                "--limit", str(args.pair_problems), "--output_dir", str(pairs_dir))
    pair_metrics = json.loads((pairs_dir / "metrics.json").read_text())
    if not (dpo_dir / "metrics.json").exists():
        times["step_dpo"] = launch("step_dpo", "--config", "configs/step_dpo/arith.yaml", "--model_name_or_path",
                                   str(sft_dir), "--pairs", str(pairs_dir / "pairs.jsonl"), "--prompt_style", "chat",
                                   "--output_dir", str(dpo_dir), "--max_length", "384", "--max_prompt_length", "256")
    dpo_metrics = json.loads((dpo_dir / "metrics.json").read_text())
    accuracy["step_dpo"], times["eval_step_dpo"] = greedy(str(dpo_dir), work / "eval_step_dpo", args.arith_problems,
                                                          args.arith_max_tokens)
    return {"problems": args.arith_problems, "greedy": accuracy, "seconds": times, "sft_rows": args.sft_rows,
            "pair_problems": args.pair_problems, "pairs": {k: v for k, v in pair_metrics.items() if not isinstance(v, (list, dict))},
            "step_dpo_train_seconds": dpo_metrics.get("train_runtime"), "step_dpo_steps": dpo_metrics.get("steps")}


STAGES = ("throughput", "gsm8k", "arith", "step_dpo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--work", default="outputs/bench_real_model", help="folder for the stages' outputs")
    parser.add_argument("--gsm8k_path", default=None, help="a local GSM8K test JSONL (else the hub)")
    parser.add_argument("--gsm8k_problems", type=int, default=200)
    parser.add_argument("--arith_problems", type=int, default=500)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--arith_max_tokens", type=int, default=128, help="step_dpo: tokens of a greedy arith answer")
    parser.add_argument("--sft_rows", type=int, default=512,
                        help="step_dpo: arith training rows of the SFT (a 16-row step of SmolLM2 is ~30 s on 2 cores)")
    parser.add_argument("--pair_problems", type=int, default=200, help="step_dpo: arith problems sampled for pairs")
    parser.add_argument("--throughput_one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.throughput_one:
        engine_name, dtype = args.throughput_one.split(":")
        Path(args.output).write_text(json.dumps(throughput_one(engine_name, dtype, args.gsm8k_path), indent=2))
        return

    os.makedirs(args.work, exist_ok=True)
    out = Path(args.output)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.setdefault("stages", {})
    runners = {
        "throughput": lambda: throughput(args),
        "gsm8k": lambda: best_of_n(args, "gsm8k", args.gsm8k_problems, args.gsm8k_path),
        "arith": lambda: best_of_n(args, "arith", args.arith_problems, None),
        "step_dpo": lambda: step_dpo(args),
    }
    for stage in args.stages.split(","):
        if stage in result["stages"]:
            continue
        started = time.time()
        figures = runners[stage]()
        figures["wall_seconds"] = round(time.time() - started, 1)
        result["stages"][stage] = figures
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps({stage: figures}, indent=2))


if __name__ == "__main__":
    main()
