"""PRM labels from trees on disk: `python launch/prm_labels.py --trees_path DIR/trees --output_dir OUT`.

Monte Carlo step values from each tree's own trajectories, topped up with fresh completions by the
policy where fewer than --k share a prefix; hard, soft or SCAN labels; optional consensus with the
arith checker. Writes `labels.jsonl` (TRL stepwise records for launch/train_prm.py) and
`summary.json`. All logic lives in `treetune.rewards.prm_labels_run`.
"""

from __future__ import annotations

import json


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    from treetune.rewards.prm_labels_run import PRMLabelArgs, run

    (args,) = TrlParser((PRMLabelArgs,)).parse_args_and_config(argv)
    summary = run(args)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
