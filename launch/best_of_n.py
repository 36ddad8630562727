"""Best-of-N evaluation: sample N solutions per problem, grade them, sweep N and selectors.

    python launch/best_of_n.py --config configs/eval/arith.yaml [--field value ...]
    python launch/best_of_n.py --config configs/eval/arith.yaml --generation beam --scorer arith_checker \
        --n 16 --search_width 4 --selectors search_pick,majority     # or dvts / mcts, --scorer PRM_FOLDER

Writes to --output_dir: trees/ (the samples, resumable), problems.jsonl (samples, answers, grades,
selections), metrics.json, summary.md, accuracy_vs_n.png; with --greedy_limit K also
greedy_metrics.json and greedy_samples.jsonl for greedy decoding of the first K problems.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    from treetune.rewards.best_of_n_run import BestOfNArgs, run

    (args,) = TrlParser((BestOfNArgs,)).parse_args_and_config(argv)
    metrics = run(args)
    print(open(f"{args.output_dir}/summary.md").read())
    if "greedy" in metrics:
        print(f"greedy accuracy on {metrics['greedy']['problems']} problems: {metrics['greedy']['accuracy']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
