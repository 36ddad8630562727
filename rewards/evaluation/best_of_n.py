"""Best-of-N evaluation over sampled trees: selectors and pass@k for every N of a sweep.

For each N in the sweep (1, 2, 4, ..., N_max) and each problem, `subsamples` random subsets of N
of the problem's candidates are drawn (one draw at N_max: all of them); every selector picks a
candidate in each subset. Reported per selector and N: the mean accuracy over draws, its spread
(standard deviation of the per-draw accuracy across problems), and the false-positive rate of the
verifier literature: how often the chosen answer is wrong although a correct one was among the N.
pass@k uses the unbiased estimator over all samples of a problem.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

from treetune.rewards.grading import Grader
from treetune.rewards.selection.selectors import Candidate, get_selector, pass_at_k
from treetune.rollouts.tree import ReasoningTree


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
                    pick = select(chosen)
                    right = pick is not None and chosen[pick].correct
                    per_draw[d].append(1.0 if right else 0.0)
                    if any(c.correct for c in chosen):
                        misses_with_a_right_one += 1
                        false_positive += not right
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
