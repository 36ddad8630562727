"""MCTS-DPO on the proving ground: 3 rounds (MCTS with the current tiny policy over fresh arith
training problems -> step pairs -> cDPO with visit-count label smoothing), greedy accuracy on 500
arith test problems before and after every round, pairs per round, and each round's time split
into search and training. Several settings ("variants") can be run side by side; each one is a
full, resumable run of `launch/mcts_dpo.py --config configs/mcts_dpo/arith.yaml` plus overrides.

    python benchmarks/mcts_dpo_arith.py --output mcts_dpo_arith.json [--variants cdpo,cdpo_sft] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides of configs/mcts_dpo/arith.yaml
VARIANTS: dict[str, list[str]] = {
    "cdpo": [],  # the recipe: beta 0.5, lr 5e-6, k = 2, 512 problems a round, checker inside, correct-only
    "cdpo_k4_1000": ["--search_width", "4", "--problems_per_round", "1000"],
    "cdpo_k4_1000_lr1e-5": ["--search_width", "4", "--problems_per_round", "1000", "--learning_rate", "1e-5"],
    "cdpo_sft": ["--search_width", "4", "--problems_per_round", "1000", "--loss_type", "sigmoid", "sft",
                 "--loss_weights", "1.0", "0.5"],
    "cdpo_outcome_only": ["--scorer", "", "--search_width", "4", "--problems_per_round", "1000"],
    "dpo_no_smoothing": ["--conservative", "false", "--search_width", "4", "--problems_per_round", "1000"],
}


def run_variant(name: str, out: Path, a) -> dict:
    from treetune.trainers.mcts_dpo.loop import main as mcts_dpo

    argv = ["--config", str(ROOT / "configs/mcts_dpo/arith.yaml"), "--output_dir", str(out), "--rounds", str(a.rounds),
            "--eval_limit", str(a.eval_problems), "--disable_tqdm", "true", *VARIANTS[name]]
    started = time.perf_counter()
    metrics = mcts_dpo(argv)
    start = metrics["greedy_accuracy_start"]
    rounds = [{"round": r["round"], "greedy_accuracy": r["greedy_accuracy"], "pairs": r["pairs"],
               "trees_with_pairs": r.get("trees_with_pairs"), "search_selected_accuracy": r.get("search_selected_accuracy"),
               "label_smoothing_mean": r.get("label_smoothing_mean"), "train_steps": r.get("train_steps"),
               "search_seconds": r["search_seconds"], "train_seconds": r["train_seconds"]} for r in metrics["rounds"]]
    last = rounds[-1]["greedy_accuracy"]
    return {"overrides": VARIANTS[name], "greedy_accuracy_start": start, "rounds": rounds,
            "gain_points_after_last_round": None if last is None else round(100 * (last - start), 1),
            "target_met (>= +5 points)": None if last is None else 100 * (last - start) >= 5.0,
            "wall_seconds_this_invocation": round(time.perf_counter() - started, 1), "output_dir": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--workdir", default=None, help="keep the runs here (a rerun resumes them)")
    parser.add_argument("--variants", default="cdpo", help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eval_problems", type=int, default=500)
    a = parser.parse_args()
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")

    from treetune.data.arith import policy_build

    work = Path(a.workdir or tempfile.mkdtemp(prefix="mcts_dpo_arith_"))
    output = Path(a.output)
    result = json.loads(output.read_text()) if output.exists() else {}
    result.setdefault("variants", {})
    result["settings"] = {"rounds": a.rounds, "eval_problems": a.eval_problems, "recipe": "configs/mcts_dpo/arith.yaml",
                          "policy": policy_build()}
    for name in names:
        result["variants"][name] = run_variant(name, work / name, a)
        done = {k: v["gain_points_after_last_round"] for k, v in result["variants"].items()}
        result["best_variant"] = max(done, key=lambda k: done[k] if done[k] is not None else -1e9)
        output.write_text(json.dumps(result, indent=2))  # after every variant, so a stop keeps what was measured
        print(json.dumps(result["variants"][name], indent=2), flush=True)


if __name__ == "__main__":
    main()
