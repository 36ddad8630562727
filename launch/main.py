"""The main job on the embedded default: build (or reuse) the arith tiny policy and evaluate it.

    python launch/main.py --config configs/arith/main.yaml [--field value ...]

Writes to --output_dir: the resolved config, `metrics.json`, and the per-problem greedy samples.
Later stages (trees, rewards, Step-DPO, the report) join this job as they land.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class MainArgs:
    output_dir: str = "outputs/main"
    model_name_or_path: str | None = None  # empty: the arith tiny policy
    eval_split: str = "test"
    eval_problems: int = 500
    max_tokens: int = 128
    seed: int = 0


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import tiny_policy
    from treetune.rewards.evaluation import greedy_eval, write_eval
    from treetune.rollouts.engines import VLLMEngine

    (args,) = TrlParser((MainArgs,)).parse_args_and_config(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))

    started = time.time()
    model = args.model_name_or_path or tiny_policy()
    build_seconds = time.time() - started
    problems = load_problems("arith", args.eval_split, limit=args.eval_problems)
    with VLLMEngine(model, seed=args.seed) as engine:
        metrics, rows = greedy_eval(engine, engine.tokenizer, problems, PromptTemplate(style="bare"), max_tokens=args.max_tokens)
    metrics.update(model=model, policy_seconds=round(build_seconds, 1), total_seconds=round(time.time() - started, 1))
    write_eval(out, metrics, rows)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    print(f"\ntiny policy: {model}")
    print(f"greedy on {metrics['problems']} arith {args.eval_split} problems:")
    print(f"  accuracy (math-verify)      {metrics['accuracy']:.1%}")
    print(f"  every step right (checker)  {metrics['all_steps_right']:.1%}")
    print(f"  steps right (checker)       {metrics['step_accuracy']:.1%}")
    print(f"outputs in {out}/", file=sys.stdout)
    return metrics


if __name__ == "__main__":
    main()
