"""Best-of-N evaluation: sample N solutions per problem, grade them, sweep N and selectors.

    python launch/best_of_n.py --config configs/best_of_n/arith.yaml [--field value ...]
    python launch/best_of_n.py --config configs/best_of_n/arith.yaml --generation beam --scorer arith_checker \
        --n 16 --search_width 4 --selectors search_pick,majority     # or dvts / mcts, --scorer PRM_FOLDER

Writes to --output_dir: trees/ (the samples, resumable), problems.jsonl (samples, answers, grades,
selections), metrics.json, summary.md, accuracy_vs_n.png; with --greedy_limit K also
greedy_metrics.json and greedy_samples.jsonl for greedy decoding of the first K problems.

A best-of-N run: sample N solutions per problem (or read existing trees), grade them, and write
the per-problem file, metrics.json, per-group tables and the accuracy-vs-N plot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from treetune.data import Problem, PromptTemplate, load_problems
from treetune.data.arith import tiny_policy
from treetune.rewards.evaluation.best_of_n import (
    assign_answer_classes,
    candidates,
    evaluate,
    group_table,
    plot_accuracy,
    selections,
    sweep,
)
from treetune.rewards.evaluation.greedy import greedy_eval, write_eval
from treetune.rewards.grading import Grader
from treetune.rewards.outcome import score_outcomes
from treetune.rewards.scorers.arith_checker import score_tree_leaves
from treetune.rewards.scorers.loading import make_search_scorer
from treetune.rewards.scorers.released import load_prm
from treetune.rewards.selection.selectors import Candidate, get_selector, register
from treetune.rollouts.run import RolloutArgs, default_prompt_style, make_engine, run_rollout
from treetune.rollouts.tree_io import read_trees


@dataclass
class BestOfNArgs:
    output_dir: str = "outputs/best_of_n"
    model_name_or_path: str | None = None  # empty: the arith tiny policy
    engine: str = "vllm"
    server_urls: str | None = None
    source: str = "arith"
    split: str = "test"
    data_path: str | None = None
    limit: int | None = 300
    prompt_style: str | None = None
    n: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    selectors: str = "first,majority,max_logprob"
    subsamples: int = 8
    trees_path: str | None = None  # evaluate these trees instead of sampling
    group_by: str = ""  # comma-separated problem fields for per-group tables (MATH: level,subject)
    prm_path: str | None = None  # a PRM (launch/train_prm.py) scoring every sample, for the prm_* selectors
    prm_separator: str = "\n"
    prm_format: str = "treetune"  # treetune | qwen (Qwen2.5-Math-PRM) | shepherd (Math-Shepherd)
    step_mode: str = "line"  # how samples split into steps for the PRM (line, blank_line, step_k)
    # generation mode: flat N-sampling, or a step search driven by a step scorer (its pick: selector search_pick)
    generation: str = "flat"  # flat | beam | dvts | mcts
    scorer: str | None = None  # beam/dvts/mcts: arith_checker, self_eval or a PRM folder (default: prm_path)
    search_width: int = 4  # beam: survivors M of the N per step; dvts: candidates per subtree M; mcts: k
    step_delimiter: str = "\n"
    step_tokens: int = 64
    aggregation: str = "last"  # step scores -> path value while searching
    mcts_iterations: int = 4  # simulations per move; MCTS grades finished nodes with the scorer, never the gold answer
    mcts_max_children: int = 0  # > search_width: progressive widening
    batch_problems: int = 64
    kv_cache_gb: float | None = None
    greedy_limit: int = 0  # also decode the first this-many problems of the split greedily (0: no)
    report_to: str = "none"  # none | wandb
    wandb_project: str = "treetune"


def rollout_args(args: BestOfNArgs) -> RolloutArgs:
    return RolloutArgs(output_dir=args.output_dir, model_name_or_path=args.model_name_or_path, engine=args.engine,
                       server_urls=args.server_urls, source=args.source, split=args.split, data_path=args.data_path,
                       limit=args.limit, prompt_style=args.prompt_style, sampler=args.generation, trajectories=args.n,
                       temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                       batch_problems=args.batch_problems, kv_cache_gb=args.kv_cache_gb, scorer=args.scorer or args.prm_path,
                       prm_separator=args.prm_separator, step_delimiter=args.step_delimiter, step_tokens=args.step_tokens,
                       search_width=args.search_width, aggregation=args.aggregation, mcts_iterations=args.mcts_iterations,
                       mcts_max_children=args.mcts_max_children, terminal_value="scorer")


def sample(args: BestOfNArgs, engine, problems: list[Problem], template: PromptTemplate, grader: Grader) -> dict:
    """Samples (flat, or a step search's trees) for every problem into `output_dir/trees`
    (resumable), graded as they finish."""
    step_scorer = None
    if args.generation != "flat":

        spec = args.scorer or args.prm_path
        if not spec:
            raise ValueError(f"generation {args.generation!r} needs --scorer (arith_checker, self_eval or a PRM folder)")
        step_scorer = make_search_scorer(spec, args.prm_separator, args.prm_format, engine=engine)
    return run_rollout(rollout_args(args), engine, engine.tokenizer, problems, template,
                       lambda trees: score_outcomes(trees, grader), step_scorer=step_scorer)


def run(args: BestOfNArgs) -> dict:
    """Sample (unless `trees_path` names trees already grown), optionally decode greedily, evaluate.
    Samples resume from disk; a finished greedy pass is not redone."""


    for name in args.selectors.split(","):
        get_selector(name.strip())  # an unknown selector fails before any sampling
    problems = load_problems(args.source, args.split, path=args.data_path, limit=args.limit)
    out = Path(args.output_dir)
    greedy_file = out / "greedy_metrics.json"
    with Grader() as grader:
        if not args.trees_path or (args.greedy_limit and not greedy_file.exists()):
            engine = make_engine(rollout_args(args), args.model_name_or_path or tiny_policy())
            template = PromptTemplate(style=default_prompt_style(args.prompt_style, bool(args.model_name_or_path), engine.tokenizer))
            try:
                if args.greedy_limit and not greedy_file.exists():
                    greedy_problems = load_problems(args.source, args.split, path=args.data_path, limit=args.greedy_limit)
                    greedy, rows = greedy_eval(engine, engine.tokenizer, greedy_problems, template,
                                               max_tokens=args.max_tokens, grader=grader)
                    write_eval(out, greedy, rows)
                if not args.trees_path:
                    sample(args, engine, problems, template, grader)
            finally:
                engine.close()
        metrics = evaluate_trees(args, problems, grader)
    if greedy_file.exists():
        metrics["greedy"] = json.loads(greedy_file.read_text())
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@register("search_pick")
def search_pick(cands: Sequence[Candidate]) -> int | None:
    """The step search's own answer (beam, DVTS, MCTS); among candidates without it, the best search value."""
    scored = [((c.scores.get("search_pick", 0.0), c.scores.get("search_value", -1.0)), -i)
              for i, c in enumerate(cands) if "search_pick" in c.scores or "search_value" in c.scores]
    return -max(scored)[1] if scored else None


def evaluate_trees(args: BestOfNArgs, problems: list[Problem], grader: Grader) -> dict:
    """Everything after sampling: classes, selector sweep, files, plot. Returns metrics."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.trees_path) if args.trees_path else out / "trees"
    wanted = {p.id: p for p in problems}
    trees = [t for t in read_trees(source) if t.problem_id in wanted]
    missing = sorted(set(wanted) - {t.problem_id for t in trees})
    if missing:
        raise ValueError(f"{source}: no trees for {len(missing)} problem(s), e.g. {missing[:3]}")
    unscored = [t for t in trees if any("outcome" not in l.scores for l in t.leaves())]
    if unscored:
        score_outcomes(unscored, grader)
    assign_answer_classes(trees, grader)
    if args.prm_path:

        score_tree_leaves(trees, load_prm(args.prm_path, args.prm_format, separator=args.prm_separator),
                          key="prm", step_mode=args.step_mode)
    names = [s.strip() for s in args.selectors.split(",") if s.strip()]
    per_problem = {t.problem_id: candidates(t) for t in trees}
    n_max = max(len(c) for c in per_problem.values())
    metrics = evaluate(per_problem, names, sweep(n_max), args.subsamples, args.seed)
    metrics.update(source=args.source, split=args.split, samples_per_problem=n_max)

    rows = []
    for tree in trees:
        cands = per_problem[tree.problem_id]
        rows.append({
            "id": tree.problem_id, "gold": tree.answer, "extra": wanted[tree.problem_id].extra,
            "samples": [{"answer": c.answer, "correct": c.correct, "answer_class": c.answer_class, "tokens": c.tokens,
                         "logprob_mean": c.logprob_mean, "text": c.text} for c in cands],
            "selected": selections(cands, names),
        })
    with (out / "problems.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    groups = [g.strip() for g in args.group_by.split(",") if g.strip()]
    metrics["groups"] = {g: group_table(rows, g, names) for g in groups}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    plot_accuracy(metrics, str(out / "accuracy_vs_n.png"), f"best-of-N on {args.source} ({len(trees)} problems)")
    (out / "summary.md").write_text(summary_markdown(metrics, names))
    if args.report_to == "wandb":
        log_to_wandb(args, metrics, out)
    return metrics


def summary_markdown(metrics: dict, names: list[str]) -> str:
    n_values = metrics["n_values"]
    lines = ["| selector | " + " | ".join(f"N={n}" for n in n_values) + " |", "|---" * (len(n_values) + 1) + "|"]
    lines.append("| pass@k | " + " | ".join(f"{metrics['pass_at_k'][str(n)]:.3f}" for n in n_values) + " |")
    for name in names:
        cells = metrics["selectors"][name]
        lines.append(f"| {name} | " + " | ".join(f"{cells[str(n)]['accuracy']:.3f} ± {cells[str(n)]['std']:.3f}" for n in n_values) + " |")
    lines += ["", "False-positive rate (chosen answer wrong though a right one was among the N):", "",
              "| selector | " + " | ".join(f"N={n}" for n in n_values) + " |", "|---" * (len(n_values) + 1) + "|"]
    for name in names:
        cells = metrics["selectors"][name]
        lines.append(f"| {name} | " + " | ".join(f"{cells[str(n)]['false_positive_rate']:.3f}" for n in n_values) + " |")
    for group, table in metrics.get("groups", {}).items():
        lines += ["", f"By {group} (N = {n_values[-1]}):", "", "| " + group + " | problems | pass@N | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 3) + "|"]
        for value, entry in table.items():
            lines.append(f"| {value} | {entry['problems']} | {entry['pass_at_n']:.3f} | " + " | ".join(f"{entry[n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def log_to_wandb(args: BestOfNArgs, metrics: dict, out: Path) -> None:
    import wandb

    run = wandb.init(project=args.wandb_project, config=asdict(args), dir=str(out), job_type="best_of_n")
    for n in metrics["n_values"]:
        row = {"n": n, "pass_at_k": metrics["pass_at_k"][str(n)]}
        row.update({f"{name}/accuracy": cells[str(n)]["accuracy"] for name, cells in metrics["selectors"].items()})
        run.log(row)
    run.log({"accuracy_vs_n": wandb.Image(str(out / "accuracy_vs_n.png"))})
    run.finish()


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser


    (args,) = TrlParser((BestOfNArgs,)).parse_args_and_config(argv)
    metrics = run(args)
    print(open(f"{args.output_dir}/summary.md").read())
    if "greedy" in metrics:
        print(f"greedy accuracy on {metrics['greedy']['problems']} problems: {metrics['greedy']['accuracy']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
