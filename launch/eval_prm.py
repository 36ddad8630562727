"""ProcessBench-style evaluation of a step scorer.

    python launch/eval_prm.py --prm_path out/prm --processbench ../data/processbench/gsm8k.json,../data/processbench/math.json
    python launch/eval_prm.py --prm_path out/prm --arith_sample 300      # truth from the exact arith checker

Writes metrics.json (per threshold: acc_err, acc_corr, F1 per split and their unweighted mean).
"""

from __future__ import annotations

import json


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    from treetune.rewards.prm_eval_run import EvalPRMArgs, run

    (args,) = TrlParser((EvalPRMArgs,)).parse_args_and_config(argv)
    metrics = run(args)
    print(json.dumps({"best_threshold": metrics["best_threshold"], "best_average_f1": metrics["best_average_f1"],
                      "splits": metrics["best"]["splits"]}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
