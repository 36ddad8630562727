"""The real-model ground measured: SmolLM2-135M-Instruct (treetune.data.pretrained.smollm2) on GSM8K
and arith, sampling throughput by engine and dtype, and the effect of one offline method.

    python benchmarks/real_model.py --output real_model.json [--stages throughput,gsm8k,arith,step_dpo]
        [--gsm8k_path ../shared/data/gsm8k/test.jsonl] [--gsm8k_problems 200] [--arith_problems 500] [--n 8]

Stages (each one's figures and wall time land in the JSON as it finishes; rerun the same command
to resume with the stages not yet done):
- throughput: the same 32 GSM8K prompts (chat template), greedy, 256 tokens, decoded by vLLM in
  float32, vLLM in bfloat16, and the transformers engine (8 of the prompts, 128 tokens): tokens/s.
- gsm8k / arith: best-of-N as a user runs it (`launch/best_of_n.py`): greedy, maj@N and pass@N.
- step_dpo: Step-DPO from the model's own arith samples (pairs by the exact checker,
  `launch/step_dpo_data.py`, then `launch/step_dpo.py`), greedy on the arith test problems before
  and after.
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


STAGES = ("throughput", "gsm8k", "arith")


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
