"""Problems -> reasoning trees on disk (TreePO segment trees, flat samples, MCTS, step beam
search or DVTS), resumable.

    python launch/rollout.py --config configs/rollout/treepo.yaml [--field value ...]
    python launch/rollout.py --config configs/rollout/mcts.yaml --scorer arith_checker
    python launch/rollout.py --config configs/rollout/beam.yaml --scorer Qwen/Qwen2.5-Math-PRM-7B \
        --scorer_format qwen --step_mode blank_line

Step search (beam, dvts, mcts) is driven by any step scorer (`--scorer`, `--scorer_format`,
`--step_mode`). Writes to --output_dir: `trees/trees-*.jsonl` (one tree a line), `config.json`,
`metrics.json` (problems, trajectories, decoded and prompt tokens, prefix-cache hit rate,
trajectories per second, outcome accuracy). Run it again on the same folder to resume.
"""

from __future__ import annotations

import json
import logging

from treetune.rewards.grading import Grader
from treetune.rewards.outcome import score_outcomes
from treetune.rewards.scorers import RENAMED_FIELDS, close_scorer, scorer_from_args
from treetune.rollouts.run import RolloutArgs, make_engine, run_rollout
from treetune.trainers.common import parse_config, setup_logging

log = logging.getLogger(__name__)

SEARCH_SAMPLERS = ("beam", "dvts", "mcts")


def run(args: RolloutArgs, engine=None) -> dict:
    """Grow (or finish growing) the trees of `args`; returns the metrics. `engine`: one already serving
    the policy, which a caller running several jobs shares (left open); else one is started from `args`."""
    if args.sampler in SEARCH_SAMPLERS and not args.scorer and not (args.sampler == "mcts" and args.terminal_value == "verifier"):
        raise ValueError(f"sampler {args.sampler!r} needs --scorer (arith_checker, tool, self_eval or a PRM folder)")
    if args.scorer and args.sampler not in SEARCH_SAMPLERS:
        log.warning("--scorer %s is not used: sampler %r is not a step search (%s)", args.scorer, args.sampler,
                    ", ".join(SEARCH_SAMPLERS))
    problems = args.load()
    owned = engine is None
    engine = make_engine(args) if owned else engine
    scorer = None
    try:
        with Grader() as grader:
            scorer = scorer_from_args(args, engine) if args.sampler in SEARCH_SAMPLERS else None
            outcomes = (lambda trees: score_outcomes(trees, grader)) if args.grade else None
            return run_rollout(args, engine, engine.tokenizer, problems, args.prompt_template(engine.tokenizer), outcomes,
                               step_scorer=scorer, verifier=grader)
    finally:
        close_scorer(scorer)
        if owned:
            engine.close()


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config((RolloutArgs,), argv, renamed=RENAMED_FIELDS)
    metrics = run(args)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
