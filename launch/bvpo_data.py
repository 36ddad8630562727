"""BVPO pairs in both modes from a policy's own samples: `python launch/bvpo_data.py --config configs/bvpo_data/arith.yaml`.

Per prompt and mode (trace on, trace off by an empty think block) it samples `--samples` responses
with vLLM, scores them and keeps best against worst. The scorer (`--scorer`) is `gold` (the gold
answer, math-verify), a sequence-classification reward model (`--scorer PATH --scorer_format
reward_model`), or any step scorer (arith_checker, tool, self_eval, a trained or released PRM)
aggregated over the answer's steps (`--aggregation`, `--step_mode`).

Writes to --output_dir: `pairs.jsonl` (prompt, chosen, rejected, mode, scores), `status.jsonl` (per
prompt and mode: a pair, or why none), `config.json` and `metrics.json`. Run it again on the same
folder to resume. With no model it samples the arith dual-mode tiny policy. The algorithm lives in
`treetune.trainers.bvpo.pairs`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from treetune.data import ProblemArgs
from treetune.data.arith import dual_mode_policy
from treetune.rewards.grading import Grader
from treetune.rewards.scorers import RENAMED_FIELDS, close_scorer
from treetune.rollouts.run import EngineArgs, SamplingArgs, make_engine, redefault
from treetune.rollouts.scoring import AGGREGATIONS, SCORER_FORMATS, ScorerArgs
from treetune.trainers.bvpo.pairs import RESPONSE_FORMATS, PairSettings, build_bvpo_pairs, response_scorer
from treetune.trainers.common import parse_config, setup_logging


def _old_reward_model_mode(value) -> tuple[str, str]:
    """`--scorer reward_model` (its path in `--scorer_path`) is now `--scorer_format reward_model`."""
    return ("scorer_format", "reward_model") if value == "reward_model" else ("scorer", value)


RENAMED = {**RENAMED_FIELDS, "scorer": _old_reward_model_mode}


@dataclass
class BVPODataArgs(ScorerArgs, PairSettings, SamplingArgs, EngineArgs, ProblemArgs):
    """Problems, the policy (default: the arith dual-mode tiny policy), sampling, the pairs, the scorer."""

    formats: ClassVar[tuple[str, ...]] = (*SCORER_FORMATS, *RESPONSE_FORMATS)

    output_dir: str = field(default="outputs/bvpo_data", metadata={
        "help": "Where pairs.jsonl, status.jsonl, config.json and metrics.json go; rerun to resume."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "The policy: a local checkpoint or a hub name; empty: the arith dual-mode tiny policy."})
    split: str = redefault(ProblemArgs, "split", "train")
    limit: int | None = redefault(ProblemArgs, "limit", 500)
    temperature: float = redefault(SamplingArgs, "temperature", 0.8)
    top_p: float = redefault(SamplingArgs, "top_p", 0.95)
    scorer: str | None = field(default="gold", metadata={
        "help": "What ranks the responses: gold (the gold answer), a reward model folder / hub name (with "
                "--scorer_format reward_model), or a step scorer: arith_checker, tool, self_eval, a PRM folder / "
                "hub name."})
    scorer_format: str = field(default="treetune", metadata={
        "help": "reward_model (a sequence-classification reward model, ArmoRM-style), or how a PRM is read: "
                + ", ".join(SCORER_FORMATS) + "."})
    aggregation: str = field(default="min", metadata={
        "help": f"Step scorers: step scores -> the response's score ({', '.join(AGGREGATIONS)})."})
    batch_problems: int = field(default=64, metadata={"help": "Problems sampled together (times the modes)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"field 'aggregation': expected one of {', '.join(AGGREGATIONS)}, not {self.aggregation!r}")


def run(args: BVPODataArgs) -> dict:
    """Sample, score and pair every (problem, mode); returns the metrics."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    problems = args.load()
    engine = make_engine(args, args.model_name_or_path or dual_mode_policy())
    scorer = None
    try:
        with Grader() as grader:
            scorer = response_scorer(args.scorer, args.scorer_format, grader, step_mode=args.step_mode,
                                     aggregation=args.aggregation, engine=engine)
            metrics = build_bvpo_pairs(out, engine, engine.tokenizer, problems, args.prompt_template(engine.tokenizer),
                                       scorer, args, args, batch_problems=args.batch_problems)
    finally:
        close_scorer(getattr(scorer, "step_scorer", scorer))
        engine.close()
    metrics["scorer"] = getattr(scorer, "name", args.scorer)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config((BVPODataArgs,), argv, renamed=RENAMED)
    metrics = run(args)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
