"""BVPO pairs in both modes from a policy's own samples: `python launch/bvpo_data.py --config configs/bvpo_data/arith.yaml`.

Per prompt and mode (trace on, trace off by an empty think block) it samples `--samples` responses
with vLLM, scores them (`--scorer gold | reward_model | arith_checker | prm`) and keeps best against
worst. Writes to --output_dir: `pairs.jsonl` (prompt, chosen, rejected, mode, scores), `status.jsonl`
(per prompt and mode: a pair, or why none) and `summary.json`. Run it again on the same folder to
resume. With no model it samples the arith dual-mode tiny policy. All logic lives in
`treetune.trainers.bvpo.pairs`.
"""

from __future__ import annotations

import json

from treetune.data import PromptTemplate, load_problems
from treetune.data.arith import dual_mode_policy
from treetune.rewards.grading import Grader
from treetune.rollouts.engines import VLLMEngine
from treetune.rollouts.run import default_prompt_style
from treetune.trainers.bvpo.pairs import BVPODataArgs, build_bvpo_pairs, make_scorer


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser


    (args,) = TrlParser((BVPODataArgs,)).parse_args_and_config(argv)
    problems = load_problems(args.source, args.split, path=args.data_path, limit=args.limit, seed=0)
    with Grader() as grader, VLLMEngine(args.model_name_or_path or dual_mode_policy(), kv_cache_gb=args.kv_cache_gb) as engine:
        style = default_prompt_style(args.prompt_style, bool(args.model_name_or_path), engine.tokenizer)
        summary = build_bvpo_pairs(args, engine, engine.tokenizer, problems, PromptTemplate(style=style),
                                   make_scorer(args, grader))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
