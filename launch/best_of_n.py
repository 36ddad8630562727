"""Best-of-N evaluation: sample N solutions per problem, grade them, sweep N and selectors.

    python launch/best_of_n.py --config configs/best_of_n/arith.yaml [--field value ...]
    python launch/best_of_n.py --config configs/best_of_n/arith.yaml --generation beam --scorer arith_checker \
        --n 16 --search_width 4 --selectors search_pick,majority     # or dvts / mcts, --scorer PRM_FOLDER
    python launch/best_of_n.py --config configs/best_of_n/math500.yaml --scorer Qwen/Qwen2.5-Math-PRM-7B \
        --scorer_format qwen --step_mode blank_line --selectors majority,prm_min,weighted_prm_last

`--scorer` (any step scorer: the arith checker, the tool, self-evaluation, a trained or released
PRM) drives the step search when `--generation` is one, and scores every sample for the `prm_*`
and `weighted_prm_*` selectors when one is asked for.

Writes to --output_dir: trees/ (the samples, resumable), problems.jsonl (samples, answers, grades,
selections), config.json, metrics.json, summary.md, accuracy_vs_n.png; with --greedy_limit K also
greedy_metrics.json and greedy_samples.jsonl for greedy decoding of the first K problems.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from treetune.data import Problem, ProblemArgs, PromptTemplate, load_problems
from treetune.rewards.evaluation.best_of_n import evaluate_leaves, problem_trees, sample_graded, write_report
from treetune.rewards.evaluation.greedy import greedy_eval, write_eval
from treetune.rewards.grading import Grader
from treetune.rewards.scorers import RENAMED_FIELDS, close_scorer, scorer_from_args
from treetune.rewards.selection.selectors import Candidate, get_selector, register
from treetune.rollouts.run import (
    EngineArgs,
    RolloutArgs,
    SamplingArgs,
    SearchArgs,
    make_engine,
    redefault,
)
from treetune.rollouts.scoring import ScorerArgs
from treetune.rollouts.tree_io import read_trees
from treetune.trainers.common import parse_config, setup_logging

log = logging.getLogger(__name__)

GENERATIONS = ("flat", "beam", "dvts", "mcts")


@dataclass
class BestOfNArgs(ScorerArgs, SearchArgs, SamplingArgs, EngineArgs, ProblemArgs):
    """Best-of-N: problems, policy, sampling, the step scorer (search and prm_* selectors), then the evaluation."""

    output_dir: str = field(default="outputs/best_of_n", metadata={
        "help": "Where trees/, problems.jsonl, config.json, metrics.json, summary.md and the plot go; rerun to resume."})
    limit: int | None = redefault(ProblemArgs, "limit", 300)
    n: int = field(default=64, metadata={"help": "Samples per problem (N_max of the sweep)."})
    selectors: str = field(default="first,majority,max_logprob", metadata={
        "help": "Comma-separated selectors: first, majority, max_logprob, prm_{last,min,product,mean}, "
                "weighted_prm_*, weighted:<score key>[:<aggregation>], rpc, search_pick, ..."})
    subsamples: int = field(default=8, metadata={"help": "Random subsets of the N samples drawn per N < N_max."})
    trees_path: str | None = field(default=None, metadata={
        "help": "Evaluate these trees (a folder of shards or a file) instead of sampling."})
    group_by: str = field(default="", metadata={
        "help": "Comma-separated problem fields for per-group tables (MATH: level,subject)."})
    generation: str = field(default="flat", metadata={
        "help": "flat (N independent samples) or a step search driven by --scorer: beam, dvts, mcts (its own answer: "
                "selector search_pick)."})
    mcts_iterations: int = redefault(SearchArgs, "mcts_iterations", 4)
    terminal_value: str = field(default="scorer", metadata={
        "help": "mcts: finished nodes are valued by the scorer; an evaluation never grades with the gold answer "
                "while it searches."})
    batch_problems: int = field(default=64, metadata={"help": "Problems sampled together (one engine batch per step)."})
    greedy_limit: int = field(default=0, metadata={
        "help": "Also decode the first this-many problems of the split greedily (0: no)."})
    report_to: str = field(default="none", metadata={"help": "none | wandb: also log the sweep and the plot to wandb."})
    wandb_project: str = field(default="treetune", metadata={"help": "The wandb project, with --report_to wandb."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.generation not in GENERATIONS:
            raise ValueError(f"field 'generation': expected one of {', '.join(GENERATIONS)}, not {self.generation!r}")
        if self.terminal_value != "scorer":
            raise ValueError("field 'terminal_value': best-of-N values finished nodes with the scorer; the gold "
                             "answer is only for grading the picks")

    @property
    def selector_names(self) -> list[str]:
        return [s.strip() for s in self.selectors.split(",") if s.strip()]


def reads_prm_scores(names: Sequence[str]) -> bool:
    """Whether a selector reads the step scores `evaluate_leaves` writes as `scores["prm"]`."""
    return any(n.startswith(("prm_", "weighted_prm_")) or n.split(":")[:2] == ["weighted", "prm"] for n in names)


def rollout_args(args: BestOfNArgs) -> RolloutArgs:
    """The rollout that grows the samples: the shared parts as they are, N trajectories by `generation`."""
    shared = {f.name for f in fields(RolloutArgs)} & {f.name for f in fields(BestOfNArgs)}
    return RolloutArgs(**{name: getattr(args, name) for name in shared}, sampler=args.generation, trajectories=args.n)


def sample(args: BestOfNArgs, engine, problems: list[Problem], template: PromptTemplate, grader: Grader,
           scorer=None) -> dict:
    """Samples (flat, or a step search's trees) for every problem into `output_dir/trees`
    (resumable), graded as they finish; a search builds `--scorer` unless `scorer` is given."""
    owned = None
    if args.generation != "flat" and scorer is None:
        if not args.scorer:
            raise ValueError(f"generation {args.generation!r} needs --scorer (arith_checker, tool, self_eval or a PRM)")
        scorer = owned = scorer_from_args(args, engine)
    try:
        return sample_graded(rollout_args(args), engine, problems, template, grader,
                             step_scorer=scorer if args.generation != "flat" else None)
    finally:
        close_scorer(owned)


def sampled_already(trees: Path, problems: Sequence[Problem]) -> bool:
    """Every problem has its tree in `trees` (a rerun then starts no engine: an engine start is
    tens of seconds on a CPU)."""
    return trees.is_dir() and {p.id for p in problems} <= {t.problem_id for t in read_trees(trees)}


def run(args: BestOfNArgs, engine=None) -> dict:
    """Sample (unless `trees_path` names trees already grown), optionally decode greedily, evaluate.
    Samples resume from disk; a finished greedy pass is not redone. `engine`: one already serving the
    policy, shared by a caller running several jobs (left open); else one is started when needed."""
    for name in args.selector_names:
        get_selector(name)  # an unknown selector fails before any sampling
    if args.generation != "flat" and not args.scorer:
        raise ValueError(f"generation {args.generation!r} needs --scorer (arith_checker, tool, self_eval or a PRM)")
    if args.scorer and args.generation == "flat" and not reads_prm_scores(args.selector_names):
        log.warning("--scorer %s is not used: generation is flat and no selector reads its scores (prm_*, "
                    "weighted_prm_*)", args.scorer)
    problems = args.load()
    out = Path(args.output_dir)
    greedy_file = out / "greedy_metrics.json"
    needs_scorer = args.generation != "flat" or reads_prm_scores(args.selector_names)
    to_sample = not args.trees_path and not sampled_already(out / "trees", problems)
    needs_engine = to_sample or (args.greedy_limit and not greedy_file.exists()) or \
        (needs_scorer and args.scorer == "self_eval")
    owned = engine is None
    scorer = None
    with Grader() as grader:
        try:
            if needs_engine and owned:
                engine = make_engine(args)
            if needs_scorer:
                scorer = scorer_from_args(args, engine)
            if engine is not None:
                template = args.prompt_template(engine.tokenizer)
                if args.greedy_limit and not greedy_file.exists():
                    greedy_problems = load_problems(args.source, args.split, path=args.data_path, limit=args.greedy_limit,
                                                    seed=args.problem_seed)
                    greedy, rows = greedy_eval(engine, engine.tokenizer, greedy_problems, template,
                                               max_tokens=args.max_tokens, grader=grader)
                    write_eval(out, greedy, rows)
                if to_sample:
                    sample(args, engine, problems, template, grader, scorer)
            metrics = evaluate_trees(args, problems, grader, scorer)
        finally:
            close_scorer(scorer)
            if engine is not None and owned:
                engine.close()
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


def evaluate_trees(args: BestOfNArgs, problems: list[Problem], grader: Grader, scorer=None) -> dict:
    """Everything after sampling: classes, the scorer's step scores (for the prm_* selectors), the
    selector sweep, files, plot. Returns metrics. `scorer` defaults to `--scorer`, built here."""
    out = Path(args.output_dir)
    trees = problem_trees(Path(args.trees_path) if args.trees_path else out / "trees", problems)
    names = args.selector_names
    owned = None
    if scorer is None and args.scorer and reads_prm_scores(names):
        scorer = owned = scorer_from_args(args)
    try:
        metrics, rows = evaluate_leaves(trees, problems, names, grader,
                                        scorer=scorer if reads_prm_scores(names) else None, step_mode=args.step_mode,
                                        subsamples=args.subsamples, seed=args.seed,
                                        group_by=[g.strip() for g in args.group_by.split(",") if g.strip()])
    finally:
        close_scorer(owned)
    metrics.update(source=args.source, split=args.split)
    write_report(out, metrics, rows, names, f"best-of-N on {args.source} ({len(trees)} problems)")
    (out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    if args.report_to == "wandb":
        log_to_wandb(args, metrics, out)
    return metrics


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
    setup_logging()
    (args,) = parse_config((BestOfNArgs,), argv, renamed=RENAMED_FIELDS)
    metrics = run(args)
    print((Path(args.output_dir) / "summary.md").read_text())
    if "greedy" in metrics:
        print(f"greedy accuracy on {metrics['greedy']['problems']} problems: {metrics['greedy']['accuracy']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
