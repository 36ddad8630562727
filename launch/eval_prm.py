"""ProcessBench-protocol evaluation of any step scorer, on ProcessBench files and on arith
solutions whose truth comes from the exact checker.

    python launch/eval_prm.py --scorer outputs/prm/model --processbench ../data/processbench/gsm8k.json,../data/processbench/math.json
    python launch/eval_prm.py --scorer Qwen/Qwen2.5-Math-PRM-7B --scorer_format qwen --processbench ...
    python launch/eval_prm.py --scorer outputs/prm/model --arith_sample 300      # truth from the exact arith checker

Writes to --output_dir: config.json and metrics.json (per threshold: acc_err, acc_corr, F1 per
split and their unweighted mean; the best threshold).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from treetune.rewards.evaluation.processbench import arith_cases, evaluate_splits, load_processbench, sample_arith_trees
from treetune.rewards.scorers import RENAMED_FIELDS, close_scorer, scorer_from_args
from treetune.rollouts.run import EngineArgs, make_engine
from treetune.rollouts.scoring import ScorerArgs
from treetune.rollouts.tree_io import read_trees
from treetune.trainers.common import parse_config, setup_logging

log = logging.getLogger(__name__)


@dataclass
class EvalPRMArgs(ScorerArgs, EngineArgs):
    """The scorer under test, the policy (arith samples, and the judge of self_eval), the cases, the thresholds."""

    output_dir: str = field(default="outputs/eval_prm", metadata={"help": "Where config.json and metrics.json go."})
    processbench: str = field(default="", metadata={
        "help": "Comma-separated ProcessBench-format files (problem, steps, label); each file's name is its split."})
    limit: int | None = field(default=None, metadata={
        "help": "Score only this many cases of each ProcessBench file, half with an error and half without (F1 "
                "needs both; the official files list all erroneous cases first), in file order; empty: all."})
    arith_trees: str | None = field(default=None, metadata={
        "help": "Trees of arith solutions (launch/rollout.py, launch/best_of_n.py), labelled by the exact checker."})
    arith_sample: int = field(default=0, metadata={
        "help": "Or: sample 4 solutions to each of this many arith test problems with the policy (0: no)."})
    arith_seed: int = field(default=1, metadata={"help": "Sampling seed of --arith_sample."})
    thresholds: str = field(default="0.05:0.95:0.05", metadata={
        "help": "Thresholds swept: start:stop:step, or a comma-separated list; a step below it is the first error."})


def parse_thresholds(text: str) -> list[float]:
    if ":" in text:
        start, stop, step = (float(x) for x in text.split(":"))
        count = int(round((stop - start) / step)) + 1
        return [round(start + i * step, 6) for i in range(count)]
    return [float(x) for x in text.split(",") if x.strip()]


def balanced_head(rows: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` // 2 correct cases (label -1) and the first of the erroneous ones up to `limit`,
    in file order; all rows when `limit` is empty."""
    if limit is None:
        return rows
    correct = [i for i, r in enumerate(rows) if r["label"] == -1][: limit // 2]
    erroneous = [i for i, r in enumerate(rows) if r["label"] != -1][: limit - len(correct)]
    return [rows[i] for i in sorted(correct + erroneous)]


def run(args: EvalPRMArgs, engine=None) -> dict:
    """Score every case with the scorer, sweep the thresholds; writes and returns the metrics.
    `engine`: one already serving the policy (for self_eval), shared by a caller running several jobs
    (left open); else one is started from `args` when the scorer needs it."""
    if not args.scorer:
        raise ValueError("give --scorer: arith_checker, tool, self_eval, or a PRM folder / hub name (--scorer_format)")
    if not (args.processbench.strip() or args.arith_trees or args.arith_sample):
        raise ValueError("nothing to evaluate: give --processbench files, --arith_trees or --arith_sample")
    owned = engine is None
    if owned and args.scorer == "self_eval":
        engine = make_engine(args)
    scorer = scorer_from_args(args, engine)
    try:
        scores, labels = {}, {}
        for path in [p.strip() for p in args.processbench.split(",") if p.strip()]:
            rows = balanced_head(load_processbench(path), args.limit)
            split = Path(path).stem
            scores[split] = scorer.score([r["problem"] for r in rows], [r["steps"] for r in rows])
            labels[split] = [r["label"] for r in rows]
        if args.arith_trees:
            trees = list(read_trees(args.arith_trees))
        elif args.arith_sample:
            trees = sample_arith_trees(args.arith_sample, seed=args.arith_seed, model=args.model_name_or_path)
        else:
            trees = []
        if trees:
            questions, solutions, truth = arith_cases(trees)  # arith: one step a line, whatever --step_mode says
            scores["arith"] = scorer.score(questions, solutions)
            labels["arith"] = truth
    finally:
        close_scorer(scorer)
        if engine is not None and owned:
            engine.close()
    by_threshold = evaluate_splits(scores, labels, parse_thresholds(args.thresholds))
    best = max(by_threshold, key=lambda t: by_threshold[t]["average_f1"])
    metrics = {"scorer": args.scorer, "scorer_format": args.scorer_format, "best_threshold": float(best),
               "best_average_f1": by_threshold[best]["average_f1"], "best": by_threshold[best],
               "by_threshold": by_threshold}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config((EvalPRMArgs,), argv, renamed=RENAMED_FIELDS)
    metrics = run(args)
    print(json.dumps({"best_threshold": metrics["best_threshold"], "best_average_f1": metrics["best_average_f1"],
                      "splits": metrics["best"]["splits"]}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
