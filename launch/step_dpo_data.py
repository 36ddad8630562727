"""Step-DPO pairs from a policy's own samples: `python launch/step_dpo_data.py --config configs/step_dpo_data/arith.yaml`.

Writes to --output_dir: `samples/trees/` (the sampled solutions), `pairs.jsonl` (the public
Step-DPO record plus provenance), `status.jsonl` (per problem: pairs made, or why none) and
`summary.json`. Run it again on the same folder to resume. With `--trees_path DIR` the pairs come
from the branching nodes of trees already grown (TreePO, MCTS) instead. All logic lives in
`treetune.trainers.step_dpo.pairs`.
"""

from __future__ import annotations

import json

from treetune.data import PromptTemplate, load_problems
from treetune.data.arith import tiny_policy
from treetune.rewards.grading import Grader
from treetune.rollouts.engines import VLLMEngine
from treetune.rollouts.run import default_prompt_style
from treetune.trainers.step_dpo.pairs import StepDPODataArgs, build_pairs, pairs_from_trees


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser


    (args,) = TrlParser((StepDPODataArgs,)).parse_args_and_config(argv)
    if args.trees_path:  # pairs at the branching nodes of trees already grown
        with Grader() as grader:
            summary = pairs_from_trees(args, grader)
        print(json.dumps(summary, indent=2))
        return summary
    problems = load_problems(args.source, args.split, path=args.data_path, limit=args.limit, seed=0)
    with Grader() as grader, VLLMEngine(args.model_name_or_path or tiny_policy(), kv_cache_gb=args.kv_cache_gb) as engine:
        style = default_prompt_style(args.prompt_style, bool(args.model_name_or_path), engine.tokenizer)
        summary = build_pairs(args, engine, grader, engine.tokenizer, problems, PromptTemplate(style=style))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
