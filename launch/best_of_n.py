"""Best-of-N evaluation: sample N solutions per problem, grade them, sweep N and selectors.

    python launch/best_of_n.py --config configs/eval/arith.yaml [--field value ...]
    python launch/best_of_n.py --config configs/eval/arith.yaml --generation beam --scorer arith_checker \
        --n 16 --search_width 4 --selectors search_pick,majority     # or dvts / mcts, --scorer PRM_FOLDER

Writes to --output_dir: trees/ (the samples, resumable), problems.jsonl (samples, answers, grades,
selections), metrics.json, summary.md, accuracy_vs_n.png.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import tiny_policy
    from treetune.rewards.best_of_n_run import BestOfNArgs, evaluate_trees, rollout_args, sample
    from treetune.rewards.grading import Grader
    from treetune.rewards.selectors import get_selector
    from treetune.rollouts.job import default_prompt_style, make_engine

    (args,) = TrlParser((BestOfNArgs,)).parse_args_and_config(argv)
    for name in args.selectors.split(","):
        get_selector(name.strip())  # an unknown selector fails before any sampling
    problems = load_problems(args.source, args.split, path=args.data_path, limit=args.limit)
    with Grader() as grader:
        if not args.trees_path:
            model = args.model_name_or_path or tiny_policy()
            engine = make_engine(rollout_args(args), model)
            style = default_prompt_style(args.prompt_style, bool(args.model_name_or_path), engine.tokenizer)
            try:
                sample(args, engine, problems, PromptTemplate(style=style), grader)
            finally:
                engine.close()
        metrics = evaluate_trees(args, problems, grader)
    print(open(f"{args.output_dir}/summary.md").read())
    return metrics


if __name__ == "__main__":
    main()
