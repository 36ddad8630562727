"""RPC against self-consistency on arith with the tiny policy: accuracy against N for majority (SC),
treetune's RPC (`rpc`), the authors' RPC (`rpc_reference`, their compute_rpc.py arithmetic) and the
ablations between them, how often the two RPCs answer alike, and how much each one prunes.

    python benchmarks/rpc_arith.py --output rpc_arith.json [--problems 300] [--n 64] [--trees DIR]

Samples go to DIR/trees (default outputs/rpc_arith, resumable), so a rerun skips sampling. Every
N < N_max averages `--resamples` random subsets of each problem's samples; N_max uses them all.
`rpc_reference` shares the credit of tied answers, as the authors' accuracy does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

SELECTORS = ["majority", "rpc", "rpc_reference", "rpc_mean", "pc", "pc_mean", "reference_votes_two_start", "max_logprob"]
LABELS = {"majority": "self-consistency (SC)", "rpc": "treetune RPC (two-start fit, joint p, distinct)",
          "rpc_reference": "authors' RPC (single-start fit, mean p, distinct)",
          "rpc_mean": "two-start fit, mean p, every path", "pc": "PC, no pruning (joint p, distinct)",
          "pc_mean": "mean-p votes, no pruning", "reference_votes_two_start": "authors' votes, treetune's two-start pruning",
          "max_logprob": "max mean log-prob"}
BOLD = ("majority", "rpc", "rpc_reference")


def register_ablations() -> None:
    """`pc_mean`: `rpc_mean` without pruning (what pruning adds). `reference_votes_two_start`: the
    authors' votes (length-normalised p summed over distinct completion texts) after treetune's
    two-start pruning, which separates the effect of the fit from that of the votes."""
    from treetune.rewards.selection.rpc import consistency_weights, prune_mask
    from treetune.rewards.selection.selectors import SELECTORS as REGISTRY
    from treetune.rewards.selection.selectors import class_vote_weights, consistency_selector, register

    if "reference_votes_two_start" in REGISTRY:
        return
    register("pc_mean")(consistency_selector(prune=False, joint=False))

    @register("reference_votes_two_start")
    def reference_votes_two_start(candidates):
        usable = [i for i, c in enumerate(candidates) if c.logprob_mean is not None]
        if not usable:
            return None
        p = [math.exp(candidates[i].logprob_mean) for i in usable]
        votes = consistency_weights(p, [candidates[i].text for i in usable], prune_mask(p))
        weights = [0.0] * len(candidates)
        for i, v in zip(usable, votes):
            weights[i] = v
        return class_vote_weights(candidates, weights)


def smallest_matching_n(metrics: dict, name: str, target: float, tolerance: float) -> int | None:
    for n in metrics["n_values"]:
        if metrics["selectors"][name][str(n)]["accuracy"] >= target - tolerance - 1e-12:
            return n
    return None


COLLAPSED_K = 50.0  # a Weibull of shape k >= 50 has a coefficient of variation <= 2.6%: nearly one point


def collapsed(k1: float, lam1: float, k2: float, lam2: float) -> bool:
    """A degenerate fit: a component shrunk onto nearly one point, or run to the 0.01 scale bound."""
    return max(k1, k2) >= COLLAPSED_K or min(lam1, lam2) <= 0.01 + 1e-9


def pruning_stats(per_problem: dict) -> dict:
    """At N_max, for treetune's two-start fit and the authors' single start: how many paths each
    prunes, how often pruned and kept paths are right, how many fits are degenerate, the time."""
    from treetune.rewards.selection import rpc, rpc_reference

    fits = {"rpc": (rpc.fit_weibull_mixture, rpc.prune_mask), "rpc_reference": (rpc_reference.fit, rpc_reference.prune_mask)}
    out = {}
    for name, (fit, prune) in fits.items():
        pruned_right = pruned = kept_right = kept = degenerate = fitted = 0
        started = time.perf_counter()
        for cands in per_problem.values():
            usable = [c for c in cands if c.logprob_mean is not None]
            p = [math.exp(c.logprob_mean) for c in usable]
            mask = [False] * len(p)
            if len(p) > 1:
                mixture = fit(p)  # fitted here, not from the selectors' cache: timed
                mask = prune(p, mixture)
                fitted += 1
                degenerate += collapsed(mixture.k1, mixture.lam1, mixture.k2, mixture.lam2)
            for c, m in zip(usable, mask):
                if m:
                    pruned += 1
                    pruned_right += c.correct
                else:
                    kept += 1
                    kept_right += c.correct
        out[name] = {"paths": pruned + kept, "pruned_fraction": pruned / max(1, pruned + kept),
                     "pruned_paths_correct_rate": pruned_right / max(1, pruned),
                     "kept_paths_correct_rate": kept_right / max(1, kept),
                     "degenerate_fit_share": degenerate / max(1, fitted),
                     "fit_and_prune_ms_per_problem": 1000 * (time.perf_counter() - started) / max(1, len(per_problem))}
    return out


def agreement(per_problem: dict, n_values: list[int], resamples: int, seed: int, a: str = "rpc",
              b: str = "rpc_reference") -> dict[str, float]:
    """Per N: the share of subsets in which selectors a and b answer with the same answer class."""
    from treetune.rewards.selection.selectors import get_selector

    pick_a, pick_b = get_selector(a), get_selector(b)
    out = {}
    for n in n_values:
        same = total = 0
        for pid, cands in sorted(per_problem.items()):
            # the subsets evaluate() draws, so both selectors' fits come from their caches
            rng = random.Random(f"{seed}:{pid}:{n}")
            subsets = [list(range(len(cands)))] if n >= len(cands) else [sorted(rng.sample(range(len(cands)), n))
                                                                           for _ in range(resamples)]
            for subset in subsets:
                chosen = [cands[i] for i in subset]
                i, j = pick_a(chosen), pick_b(chosen)
                same += (None if i is None else chosen[i].answer_class) == (None if j is None else chosen[j].answer_class)
                total += 1
        out[str(n)] = same / max(1, total)
    return out


def plot(metrics: dict, target: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_values = metrics["n_values"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for name in SELECTORS:
        by_n = metrics["selectors"][name]
        mean = [by_n[str(n)]["accuracy"] for n in n_values]
        std = [by_n[str(n)]["std"] for n in n_values]
        bold = name in BOLD
        ax.plot(n_values, mean, marker="o", lw=2 if bold else 1, alpha=1 if bold else 0.6, label=LABELS[name],
                ls="-" if bold else "--")
        if name in BOLD:
            ax.fill_between(n_values, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    ax.axhline(target, color="grey", ls=":", label=f"SC@{n_values[-1]} = {target:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n_values, [str(n) for n in n_values])
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--trees", default="outputs/rpc_arith", help="rollout folder; samples live in DIR/trees")
    parser.add_argument("--resamples", type=int, default=8, help="random subsets averaged at each N < n")
    parser.add_argument("--tolerance", type=float, default=0.005,
                        help="RPC 'matches' SC@n when within this much accuracy (also reported strictly)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="PNG path (default: the output with .png)")
    args = parser.parse_args()
    # L-BFGS-B calls BLAS on 5x5 matrices; OpenBLAS threads only contend there (10-40x slower on 2 cores).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import policy_build, tiny_policy
    from treetune.launch.best_of_n import BestOfNArgs, rollout_args, sample
    from treetune.rewards.evaluation.best_of_n import assign_answer_classes, candidates, evaluate, sweep
    from treetune.rewards.grading import Grader
    from treetune.rewards.outcome import score_outcomes
    from treetune.rollouts.run import make_engine
    from treetune.rollouts.tree_io import read_trees

    register_ablations()
    run = BestOfNArgs(output_dir=args.trees, limit=args.problems, n=args.n, max_tokens=128, seed=args.seed)
    problems = load_problems("arith", "test", limit=args.problems)
    wanted = {p.id for p in problems}
    tree_dir = Path(args.trees) / "trees"
    result: dict = {"problems": len(problems), "n": args.n, "resamples": args.resamples, "tolerance": args.tolerance,
                    "policy": policy_build(), "temperature": run.temperature, "max_tokens": run.max_tokens}
    with Grader() as grader:
        have = {t.problem_id for t in read_trees(tree_dir)} if tree_dir.exists() else set()
        if wanted - have:
            engine = make_engine(rollout_args(run), tiny_policy())
            try:
                started = time.perf_counter()
                summary = sample(run, engine, problems, PromptTemplate(style="bare"), grader)
                result["sampling_seconds"] = round(time.perf_counter() - started, 1)
                result["new_trees"] = summary["new_trees"]
            finally:
                engine.close()
        else:
            result["sampling_seconds"] = 0.0  # every tree was on disk already
        trees = [t for t in read_trees(tree_dir) if t.problem_id in wanted]
        unscored = [t for t in trees if any("outcome" not in l.scores for l in t.leaves())]
        if unscored:
            score_outcomes(unscored, grader)
        assign_answer_classes(trees, grader)
    per_problem = {t.problem_id: candidates(t) for t in trees}
    repeats = sum(len(c) - len({x.text for x in c}) for c in per_problem.values())
    result["samples_repeating_an_earlier_one_word_for_word"] = repeats / sum(len(c) for c in per_problem.values())
    n_max = min(len(c) for c in per_problem.values())
    started = time.perf_counter()
    metrics = evaluate(per_problem, SELECTORS, sweep(n_max), args.resamples, args.seed)
    result["evaluation_seconds"] = round(time.perf_counter() - started, 1)

    target = metrics["selectors"]["majority"][str(n_max)]["accuracy"]
    result["sc_at_n_max"] = target
    result["rpc_at_n_max"] = metrics["selectors"]["rpc"][str(n_max)]["accuracy"]
    result["rpc_reference_at_n_max"] = metrics["selectors"]["rpc_reference"][str(n_max)]["accuracy"]
    result["rpc_best"] = max((cell["accuracy"], int(n)) for n, cell in metrics["selectors"]["rpc"].items())
    result["rpc_reference_best"] = max((cell["accuracy"], int(n)) for n, cell in metrics["selectors"]["rpc_reference"].items())
    result["rpc_and_rpc_reference_same_answer"] = agreement(per_problem, metrics["n_values"], args.resamples, args.seed)
    result["smallest_n_matching_sc_at_n_max"] = {
        name: {"strict": smallest_matching_n(metrics, name, target, 0.0),
               "within_tolerance": smallest_matching_n(metrics, name, target, args.tolerance)} for name in SELECTORS}
    result["sc_at_n_max_standard_error"] = math.sqrt(target * (1 - target) / len(problems))
    result["target_n_at_most"] = n_max // 2
    result["pruning_at_n_max"] = pruning_stats(per_problem)
    result["accuracy"] = {name: {n: cell["accuracy"] for n, cell in by_n.items()} for name, by_n in metrics["selectors"].items()}
    result["std_across_resamples"] = {name: {n: cell["std"] for n, cell in by_n.items()} for name, by_n in metrics["selectors"].items()}
    result["false_positive_rate"] = {name: {n: cell["false_positive_rate"] for n, cell in by_n.items()}
                                     for name, by_n in metrics["selectors"].items()}
    result["pass_at_k"] = metrics["pass_at_k"]
    plot_path = args.plot or str(Path(args.output).with_suffix(".png"))
    plot(metrics, target, plot_path, f"RPC vs self-consistency on arith ({len(problems)} problems, tiny policy, "
                                     f"{args.resamples} subsets per N)")
    result["plot"] = plot_path
    Path(args.output).write_text(json.dumps(result, indent=2))
    header = "| selector | " + " | ".join(f"N={n}" for n in metrics["n_values"]) + " |"
    print(header)
    for name in SELECTORS:
        print(f"| {name} | " + " | ".join(f"{result['accuracy'][name][str(n)]:.3f}" for n in metrics["n_values"]) + " |")
    print({k: v for k, v in result.items() if k not in ("accuracy", "std_across_resamples", "false_positive_rate", "pass_at_k")})


if __name__ == "__main__":
    main()
