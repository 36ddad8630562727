"""Problems -> reasoning trees on disk (TreePO segment trees, flat samples, MCTS, step beam
search or DVTS), resumable.

    python launch/rollout.py --config configs/rollout/treepo.yaml [--field value ...]
    python launch/rollout.py --config configs/rollout/mcts.yaml --scorer arith_checker

Writes to --output_dir: `trees/trees-*.jsonl` (one tree a line), `config.json`, `metrics.json`
(problems, trajectories, decoded and prompt tokens, prefix-cache hit rate, trajectories per
second, outcome accuracy). Run it again on the same folder to resume.
"""

from __future__ import annotations

import json

from treetune.data import PromptTemplate, load_problems
from treetune.data.arith import tiny_policy
from treetune.rewards.grading import Grader
from treetune.rewards.outcome import score_outcomes
from treetune.rewards.scorers.loading import make_search_scorer
from treetune.rollouts.run import RolloutArgs, default_prompt_style, make_engine, run_rollout


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser


    (args,) = TrlParser((RolloutArgs,)).parse_args_and_config(argv)
    model = args.model_name_or_path or tiny_policy()
    problems = load_problems(args.source, args.split, path=args.data_path, limit=args.limit, seed=0)
    engine = make_engine(args, model)
    style = default_prompt_style(args.prompt_style, bool(args.model_name_or_path), engine.tokenizer)
    try:
        with Grader() as grader:
            scorer = (lambda trees: score_outcomes(trees, grader)) if args.grade else None
            step_scorer = make_search_scorer(args.scorer, args.prm_separator, engine=engine)
            summary = run_rollout(args, engine, engine.tokenizer, problems, PromptTemplate(style=style), scorer,
                                  step_scorer=step_scorer, verifier=grader)
    finally:
        engine.close()
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
