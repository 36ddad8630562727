"""The main job on the embedded default: the whole loop, stage by stage, with a report.

    python launch/main.py --config configs/arith/main.yaml [--field value ...]

policy (the arith tiny policy, built on first use) -> evaluation before (greedy, best-of-N) ->
TreePO trees on training problems -> PRM labels (Monte Carlo, consensus with the checker) and a
trained PRM -> Step-DPO pairs from the trees -> Step-DPO -> evaluation after -> report.
Writes to --output_dir one folder per stage and `report/report.md` (the before/after table,
TreePO's token savings, `report/accuracy_vs_n.png`, every artefact and the command that reruns
its stage alone). Run it again on the same folder to resume at the stage it stopped in. All
logic lives in `treetune.trainers.pipeline`.
"""

from __future__ import annotations

import logging
import os


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    from treetune.trainers.pipeline import MainArgs, run_main

    logging.basicConfig(level=os.environ.get("TREETUNE_LOG", "WARNING"), format="%(asctime)s %(name)s: %(message)s")
    (args,) = TrlParser((MainArgs,)).parse_args_and_config(argv)
    state = run_main(args)
    print(open(os.path.join(args.output_dir, "report", "report.md")).read())
    return state


if __name__ == "__main__":
    main()
