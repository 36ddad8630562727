"""The tiny policy's build time and greedy accuracy on held-out arith test problems.

    python benchmarks/tiny_policy.py --output tiny_policy.json [--fresh] [--problems 500]

With --fresh the cached policy is deleted and built again from nothing (the build-time figure);
otherwise the cached one is used. Targets (issue): build at most 10 minutes on 2 CPU cores,
greedy accuracy between 30% and 75%.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--fresh", action="store_true", help="build into an empty cache and time it")
    args = parser.parse_args()

    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import cache_root, policy_key, tiny_policy
    from treetune.rewards.evaluation.greedy import greedy_eval
    from treetune.rollouts.engines import VLLMEngine

    result: dict = {}
    if args.fresh:
        shutil.rmtree(cache_root() / f"tiny-policy-{policy_key()}", ignore_errors=True)
    started = time.time()
    path = tiny_policy(quiet=True)
    result["build_seconds" if args.fresh else "load_seconds"] = round(time.time() - started, 1)
    # metrics.json; a policy built before the trainers' run files were renamed has train_metrics.json
    metrics_file = next(f for f in (Path(path) / "metrics.json", Path(path) / "train_metrics.json") if f.exists())
    train_metrics = json.loads(metrics_file.read_text())
    result["train_runtime_seconds"] = train_metrics.get("train_runtime")
    result["train_steps"] = train_metrics.get("steps")
    result["held_out_accuracy_during_training"] = train_metrics.get("held_out_accuracy")
    result["num_parameters"] = train_metrics.get("num_parameters")
    problems = load_problems("arith", "test", limit=args.problems)
    started = time.time()
    with VLLMEngine(path) as engine:
        result["vllm_load_seconds"] = round(time.time() - started, 1)
        started = time.time()
        metrics, _ = greedy_eval(engine, engine.tokenizer, problems, PromptTemplate(style="bare"), max_tokens=128)
        result["eval_seconds"] = round(time.time() - started, 1)
    result.update(metrics)
    result["targets"] = {"accuracy_between": [0.30, 0.75], "build_seconds_at_most": 600}
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
