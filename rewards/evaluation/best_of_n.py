"""Best-of-N evaluation over sampled trees: selectors and pass@k for every N of a sweep.

For each N in the sweep (1, 2, 4, ..., N_max) and each problem, `subsamples` random subsets of N
of the problem's candidates are drawn (one draw at N_max: all of them); every selector picks a
candidate in each subset. Reported per selector and N: the mean accuracy over draws, its spread
(standard deviation of the per-draw accuracy across problems), and the false-positive rate of the
verifier literature: how often the chosen answer is wrong although a correct one was among the N.
pass@k uses the unbiased estimator over all samples of a problem.

A run in pieces: `sample_graded` grows and grades the samples (resumable), `problem_trees` reads
them back, `evaluate_leaves` scores and sweeps them, `write_report` leaves the files a person reads.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from treetune.data import Problem, PromptTemplate
from treetune.rewards.grading import Grader
from treetune.rewards.outcome import score_outcomes
from treetune.rewards.scorers.arith_checker import score_tree_leaves
from treetune.rewards.selection.selectors import Candidate, get_selector, pass_at_k, selection_credit
from treetune.rollouts.run import RolloutArgs, run_rollout
from treetune.rollouts.tree import ReasoningTree
from treetune.rollouts.tree_io import read_trees


def sweep(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max, and n_max itself."""
    out, n = [], 1
    while n < n_max:
        out.append(n)
        n *= 2
    return out + [n_max]


def assign_answer_classes(trees: Sequence[ReasoningTree], grader: Grader) -> None:
    """Give every finished leaf `scores["answer_class"]`: leaves of a tree whose extracted answers
    math-verify calls equal share a class (union-find over the distinct answers)."""
    jobs = []  # (tree index, answer a, answer b)
    distinct_per_tree = []
    for t, tree in enumerate(trees):
        distinct = sorted({l.scores.get("answer") for l in tree.leaves() if l.scores.get("answer")})
        distinct_per_tree.append(distinct)
        jobs += [(t, a, b) for i, a in enumerate(distinct) for b in distinct[i + 1:]]
    verdicts = grader.equivalent_many([(a, b) for _, a, b in jobs]) if jobs else []
    same: dict[int, list[tuple[str, str]]] = {}
    for (t, a, b), ok in zip(jobs, verdicts):
        if ok:
            same.setdefault(t, []).append((a, b))
    for t, tree in enumerate(trees):
        parent = {a: a for a in distinct_per_tree[t]}

        def find(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in same.get(t, []):
            parent[find(b)] = find(a)
        roots = sorted({find(a) for a in distinct_per_tree[t]})
        class_of = {a: roots.index(find(a)) for a in distinct_per_tree[t]}
        for leaf in tree.leaves():
            answer = leaf.scores.get("answer")
            leaf.scores["answer_class"] = class_of.get(answer) if answer else None


def candidates(tree: ReasoningTree) -> list[Candidate]:
    """The tree's finished trajectories as candidates (needs `outcome` and `answer_class` scores)."""
    out = []
    for leaf in tree.leaves():
        logprobs = tree.path_logprobs(leaf.id)
        out.append(Candidate(
            text=tree.path_text(leaf.id), answer=leaf.scores.get("answer"), correct=bool(leaf.scores["outcome"]),
            answer_class=leaf.scores.get("answer_class"), tokens=len(tree.path_token_ids(leaf.id)),
            logprob_mean=sum(logprobs) / len(logprobs) if logprobs else None,
            logprob_sum=sum(logprobs) if logprobs else None,
            scores={k: v for k, v in leaf.scores.items() if k not in ("outcome", "answer", "answer_class")}))
    return out


def _draws(count: int, n: int, subsamples: int, rng: random.Random) -> list[list[int]]:
    if n >= count:
        return [list(range(count))]
    return [sorted(rng.sample(range(count), n)) for _ in range(subsamples)]


def evaluate(per_problem: dict[str, list[Candidate]], selectors: Sequence[str], n_values: Sequence[int],
             subsamples: int = 8, seed: int = 0) -> dict[str, Any]:
    """Accuracy, spread and false-positive rate per selector and N; pass@k per N."""
    chooser = {name: get_selector(name) for name in selectors}
    problems = sorted(per_problem)
    metrics: dict[str, Any] = {"problems": len(problems), "n_values": list(n_values), "subsamples": subsamples,
                               "selectors": {name: {} for name in selectors}, "pass_at_k": {}}
    for n in n_values:
        # A problem with fewer than n candidates offers all it has; one with none counts as wrong.
        metrics["pass_at_k"][str(n)] = sum(
            pass_at_k(len(per_problem[p]), sum(c.correct for c in per_problem[p]), min(n, len(per_problem[p])))
            if per_problem[p] else 0.0 for p in problems) / max(1, len(problems))
        for name, select in chooser.items():
            per_draw: list[list[float]] = [[] for _ in range(subsamples)]
            false_positive = misses_with_a_right_one = 0
            for p in problems:
                cands = per_problem[p]
                if not cands:
                    for d in range(subsamples):
                        per_draw[d].append(0.0)
                    continue
                rng = random.Random(f"{seed}:{p}:{n}")
                draws = _draws(len(cands), n, subsamples, rng)
                if len(draws) == 1:  # every draw is the same set: count it once for all
                    draws = draws * subsamples
                for d, subset in enumerate(draws):
                    chosen = [cands[i] for i in subset]
                    right = selection_credit(select, chosen)  # 1 or 0, or a share among tied answers
                    per_draw[d].append(right)
                    if any(c.correct for c in chosen):
                        misses_with_a_right_one += 1
                        false_positive += 1.0 - right
            draws = [sum(d) / len(d) for d in per_draw if d]
            metrics["selectors"][name][str(n)] = {
                "accuracy": statistics.fmean(draws) if draws else math.nan,
                "std": statistics.pstdev(draws) if len(draws) > 1 else 0.0,
                "false_positive_rate": false_positive / misses_with_a_right_one if misses_with_a_right_one else 0.0,
            }
    return metrics


def selections(cands: Sequence[Candidate], selectors: Sequence[str]) -> dict[str, int | None]:
    """Each selector's pick among all of a problem's candidates."""
    return {name: get_selector(name)(cands) for name in selectors}


def group_table(rows: Sequence[dict], key: str, selectors: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy at N_max of each selector, and pass@N_max, per value of `rows[i]["extra"][key]`."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        value = row.get("extra", {}).get(key)
        if value is not None:
            groups.setdefault(str(value), []).append(row)
    table = {}
    for value, members in sorted(groups.items()):
        entry = {"problems": len(members), "pass_at_n": sum(any(s["correct"] for s in r["samples"]) for r in members) / len(members)}
        for name in selectors:
            picks = [r["selected"][name] for r in members]
            entry[name] = sum(1 for r, i in zip(members, picks) if i is not None and r["samples"][i]["correct"]) / len(members)
        table[value] = entry
    return table


def plot_accuracy(metrics: dict[str, Any], path: str, title: str) -> None:
    """Accuracy against N (log-2 axis), one line per selector with its spread, pass@k on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_values = metrics["n_values"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(n_values, [metrics["pass_at_k"][str(n)] for n in n_values], "k--", marker="o", label="pass@k (oracle)")
    for name, by_n in metrics["selectors"].items():
        mean = [by_n[str(n)]["accuracy"] for n in n_values]
        std = [by_n[str(n)]["std"] for n in n_values]
        ax.plot(n_values, mean, marker="o", label=name)
        ax.fill_between(n_values, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(n_values, [str(n) for n in n_values])
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- a run in pieces ---------------------------------------------------------------------------------

def sample_graded(rollout: RolloutArgs, engine, problems: Sequence[Problem], template: PromptTemplate, grader: Grader,
                  step_scorer=None) -> dict:
    """Samples (flat, or a step search's trees when `step_scorer` drives one) for every problem into
    `rollout.output_dir/trees`, resumable, each tree graded as it finishes; returns the rollout summary."""
    return run_rollout(rollout, engine, engine.tokenizer, problems, template, lambda trees: score_outcomes(trees, grader),
                       step_scorer=step_scorer)


def problem_trees(source: str | Path, problems: Sequence[Problem]) -> list[ReasoningTree]:
    """The trees of `problems` in `source` (a folder of shards or one file); an error names the missing ones."""
    wanted = {p.id for p in problems}
    trees = [t for t in read_trees(source) if t.problem_id in wanted]
    missing = sorted(wanted - {t.problem_id for t in trees})
    if missing:
        raise ValueError(f"{source}: no trees for {len(missing)} problem(s), e.g. {missing[:3]}")
    return trees


def evaluate_leaves(trees: Sequence[ReasoningTree], problems: Sequence[Problem], selectors: Sequence[str], grader: Grader,
                    scorer=None, step_mode: str = "line", subsamples: int = 8, seed: int = 0,
                    group_by: Sequence[str] = ()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Everything after sampling: grade leaves not yet graded, answer classes, the step scores of
    `scorer` (when given) as `scores["prm"]`, the selector sweep and per-group tables. Returns the
    metrics and one row per problem (samples, answers, grades, each selector's pick)."""
    by_id = {p.id: p for p in problems}
    unscored = [t for t in trees if any("outcome" not in l.scores for l in t.leaves())]
    if unscored:
        score_outcomes(unscored, grader)
    assign_answer_classes(trees, grader)
    if scorer is not None:
        score_tree_leaves(trees, scorer, key="prm", step_mode=step_mode)
    per_problem = {t.problem_id: candidates(t) for t in trees}
    n_max = max(len(c) for c in per_problem.values())
    metrics = evaluate(per_problem, selectors, sweep(n_max), subsamples, seed)
    metrics["samples_per_problem"] = n_max
    rows = []
    for tree in trees:
        cands = per_problem[tree.problem_id]
        rows.append({
            "id": tree.problem_id, "gold": tree.answer, "extra": by_id[tree.problem_id].extra,
            "samples": [{"answer": c.answer, "correct": c.correct, "answer_class": c.answer_class, "tokens": c.tokens,
                         "logprob_mean": c.logprob_mean, "text": c.text} for c in cands],
            "selected": selections(cands, selectors),
        })
    metrics["groups"] = {g: group_table(rows, g, selectors) for g in group_by}
    return metrics, rows


def summary_markdown(metrics: dict[str, Any], names: Sequence[str]) -> str:
    """The accuracy and false-positive tables (and the per-group tables) as Markdown."""
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


def write_report(out: str | Path, metrics: dict[str, Any], rows: Sequence[dict[str, Any]], names: Sequence[str],
                 title: str) -> Path:
    """`problems.jsonl`, `metrics.json`, `accuracy_vs_n.png` and `summary.md` in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "problems.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_accuracy(metrics, str(out / "accuracy_vs_n.png"), title)
    (out / "summary.md").write_text(summary_markdown(metrics, names))
    return out
