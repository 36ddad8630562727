"""Step-DPO pairs from a policy's own samples: `python launch/step_dpo_data.py --config configs/step_dpo_data/arith.yaml`.

The first wrong step of each wrong sample is located by any step scorer (`--scorer`: the arith
checker, the tool, self-evaluation, a trained PRM, or a released one with `--scorer_format qwen`
or `shepherd`; `--step_mode` splits the samples into steps). Writes to --output_dir:
`samples/trees/` (the sampled solutions), `pairs.jsonl` (the public Step-DPO record plus
provenance), `status.jsonl` (per problem: pairs made, or why none), `config.json` and
`metrics.json`. Run it again on the same folder to resume. With `--trees_path DIR` the pairs come
from the branching nodes of trees already grown (TreePO, MCTS) instead, and no scorer is needed.
The algorithm lives in `treetune.trainers.step_dpo.pairs`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treetune.data import ProblemArgs
from treetune.rewards.grading import Grader
from treetune.rewards.scorers import RENAMED_FIELDS, close_scorer, scorer_from_args
from treetune.rollouts.run import EngineArgs, SamplingArgs, make_engine, redefault
from treetune.rollouts.scoring import ScorerArgs
from treetune.trainers.common import parse_config, setup_logging
from treetune.trainers.step_dpo.pairs import FirstErrorSettings, build_pairs, pairs_from_trees


@dataclass
class StepDPODataArgs(ScorerArgs, FirstErrorSettings, SamplingArgs, EngineArgs, ProblemArgs):
    """Problems, policy, Step-DPO's sampling (temperature 0.8, top_p 0.95), the pipeline, the scorer
    that finds the first wrong step; or pairs read off trees already grown."""

    output_dir: str = field(default="outputs/step_dpo_data", metadata={
        "help": "Where samples/, pairs.jsonl, status.jsonl, config.json and metrics.json go; rerun to resume."})
    split: str = redefault(ProblemArgs, "split", "train")
    limit: int | None = redefault(ProblemArgs, "limit", 500)
    temperature: float = redefault(SamplingArgs, "temperature", 0.8)
    top_p: float = redefault(SamplingArgs, "top_p", 0.95)
    scorer: str | None = redefault(ScorerArgs, "scorer", "arith_checker")
    batch_problems: int = field(default=64, metadata={"help": "Problems sampled and paired together."})
    trees_path: str | None = field(default=None, metadata={
        "help": "Or: pairs at the branching nodes of these scored trees (launch/rollout.py TreePO, MCTS)."})
    value_key: str = field(default="outcome", metadata={
        "help": "--trees_path: a node's value, a score key (MCTS: q), else the share of right leaves below it."})
    margin: float = field(default=0.5, metadata={"help": "--trees_path: least value gap between the two siblings."})


def run(args: StepDPODataArgs) -> dict:
    """Sample, locate, rectify and pair (or read pairs off `trees_path`); returns the metrics."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    if args.trees_path:  # pairs at the branching nodes of trees already grown
        with Grader() as grader:
            metrics = pairs_from_trees(args.trees_path, out, grader, args.value_key, args.margin)
    else:
        if not args.scorer:
            raise ValueError("Step-DPO pairs from samples need --scorer to find the first wrong step")
        problems = args.load()
        engine = make_engine(args)
        scorer = None
        try:
            with Grader() as grader:
                scorer = scorer_from_args(args, engine)
                metrics = build_pairs(out, engine, grader, engine.tokenizer, problems,
                                      args.prompt_template(engine.tokenizer), scorer, args, args,
                                      step_mode=args.step_mode, batch_problems=args.batch_problems)
        finally:
            close_scorer(scorer)
            engine.close()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config((StepDPODataArgs,), argv, renamed=RENAMED_FIELDS)
    metrics = run(args)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
