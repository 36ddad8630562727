"""Search over reasoning steps on arith with the tiny policy: accuracy against generated tokens for
flat best-of-N, step beam search, DVTS and MCTS, each driven by the trained PRM and by the exact
checker (a perfect step scorer, for reference); and MCTS throughput (simulations per second) with
the leaves of many trees batched per engine call against one tree at a time.

    python benchmarks/search_arith.py --output search_arith.json [--prm_path DIR] [--problems 300]

Without --prm_path a PRM is trained first by benchmarks/prm_arith.py (the house recipe; ~15 min).
No method sees the gold answer: MCTS grades finished nodes with the scorer (`terminal_value=scorer`);
only the extra `mcts_verifier` row (the training-data setting of MCTS-DPO) uses it, and is marked so.
Tokens are the tokens the engine generated per problem (duplicates merged by MCTS included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_prm(workdir: Path) -> str:
    """Train the arith PRM with the house recipe (benchmarks/prm_arith.py) and return its folder."""
    out = workdir / "prm_run"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prm_arith.py"), "--output", str(workdir / "prm_arith.json"),
                    "--workdir", str(out), "--eval_problems", "100"], check=True)
    return str(out / "prm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--prm_path", default=None, help="a PRM from launch/train_prm.py (default: train one)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--budgets", default="4,8,16,32", help="N for flat best-of-N, beam search and DVTS")
    parser.add_argument("--expand", type=int, default=4, help="children per survivor: beam keeps N/expand, DVTS M = expand")
    parser.add_argument("--mcts_iterations", default="1,2,4", help="simulations per move")
    parser.add_argument("--mcts_width", type=int, default=4)
    parser.add_argument("--mcts_max_children", type=int, default=16, help="progressive widening for the mcts_widen rows")
    parser.add_argument("--aggregations", default="last,min", help="PRM step scores -> path value for flat best-of-N")
    parser.add_argument("--search_aggregations", default="min", help="PRM step scores -> path value for the searches")
    parser.add_argument("--throughput_problems", type=int, default=64)
    parser.add_argument("--max_tokens", type=int, default=128)
    args = parser.parse_args()

    from tqdm.auto import tqdm
    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import policy_build, tiny_policy
    from treetune.rewards.grading import Grader
    from treetune.rewards.outcome import score_outcomes
    from treetune.rewards.scorers.arith_checker import AGGREGATIONS, ArithCheckerScorer, aggregate, score_tree_leaves
    from treetune.rewards.scorers.discriminative import DiscriminativePRM
    from treetune.rollouts.engines import GenerationRequest, SamplingSettings, VLLMEngine
    from treetune.rollouts.flat import FlatSampler, FlatSettings
    from treetune.rollouts.mcts import MCTSSampler, MCTSSettings
    from treetune.rollouts.run import new_tree
    from treetune.rollouts.step_search import BeamSearchSampler, BeamSettings, DVTSSampler, DVTSSettings

    work = Path(args.workdir or tempfile.mkdtemp(prefix="search_arith_"))
    work.mkdir(parents=True, exist_ok=True)
    prm_path = args.prm_path or train_prm(work)
    budgets = [int(x) for x in args.budgets.split(",")]
    iterations = [int(x) for x in args.mcts_iterations.split(",")]
    aggregations = [a.strip() for a in args.aggregations.split(",") if a.strip()]
    search_aggregations = [a.strip() for a in args.search_aggregations.split(",") if a.strip()]
    for how in aggregations + search_aggregations:
        if how not in AGGREGATIONS:
            raise SystemExit(f"unknown aggregation {how!r}")
    problems = load_problems("arith", "test", limit=args.problems)
    template = PromptTemplate(style="bare")
    scorers = {"prm": DiscriminativePRM(prm_path), "checker": ArithCheckerScorer()}
    result: dict = {"start_policy": policy_build(), "problems": len(problems), "prm_path": prm_path, "max_tokens": args.max_tokens, "rows": []}
    rows = result["rows"]

    with Grader() as grader, VLLMEngine(tiny_policy()) as engine:
        def fresh(subset=problems):
            return [new_tree(p, template, engine.tokenizer) for p in subset]

        def judge(trees) -> tuple[float, float]:
            """(accuracy of the search's picks, mean generated tokens per problem)."""
            picks = [t.sampler["stats"]["answer_leaf"] for t in trees]
            texts = [t.path_text(i) if i is not None else "" for t, i in zip(trees, picks)]
            right = grader.grade_many(texts, [t.answer for t in trees])
            return sum(right) / len(trees), sum(t.sampler["stats"]["generated_tokens"] for t in trees) / len(trees)

        def record(method: str, scorer: str, setting: dict, trees, seconds: float, **extra) -> None:
            accuracy, tokens = judge(trees)
            row = {"method": method, "scorer": scorer, **setting, "accuracy": round(accuracy, 4),
                   "tokens_per_problem": round(tokens, 1), "seconds": round(seconds, 1), **extra}
            if trees and "scored_paths" in trees[0].sampler["stats"]:
                row["scored_paths_per_problem"] = round(sum(t.sampler["stats"]["scored_paths"] for t in trees) / len(trees), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)

        # the policy alone: greedy decoding
        started = time.perf_counter()
        greedy = engine.generate([GenerationRequest(t.prompt_ids, SamplingSettings(temperature=0.0, max_tokens=args.max_tokens))
                                  for t in fresh()])
        right = grader.grade_many([r.completions[0].text for r in greedy], [p.answer for p in problems])
        rows.append({"method": "greedy", "scorer": None, "accuracy": round(sum(right) / len(problems), 4),
                     "tokens_per_problem": round(sum(len(r.completions[0].token_ids) for r in greedy) / len(problems), 1),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)

        # flat best-of-N: one sample of N_max per problem, best-of-N on its first N samples
        started = time.perf_counter()
        flat = list(FlatSampler(FlatSettings(n=max(budgets), max_tokens=args.max_tokens, seed=0)).grow(engine, fresh()))
        result["flat_sampling_seconds"] = round(time.perf_counter() - started, 1)
        score_outcomes(flat, grader)
        for name, scorer in scorers.items():
            started = time.perf_counter()
            score_tree_leaves(flat, scorer, key=name, step_mode="line")
            result[f"flat_scoring_seconds_{name}"] = round(time.perf_counter() - started, 1)
            for how in (aggregations if name == "prm" else ["min"]):
                for n in budgets:
                    right = tokens = 0
                    for tree in flat:
                        leaves = tree.leaves()[:n]
                        best = max(range(len(leaves)), key=lambda i: (aggregate(leaves[i].scores[name], how), -i))
                        right += leaves[best].scores["outcome"]
                        tokens += sum(len(l.token_ids) for l in leaves)
                    rows.append({"method": "flat_best_of_n", "scorer": name, "aggregation": how, "n": n,
                                 "accuracy": round(right / len(flat), 4), "tokens_per_problem": round(tokens / len(flat), 1),
                                 "scored_paths_per_problem": n})
                    print(json.dumps(rows[-1]), flush=True)
        for n in budgets:  # majority vote, for reference (no scorer)
            from collections import Counter

            right = 0
            for tree in flat:
                leaves = tree.leaves()[:n]
                votes = Counter(l.scores["answer"] for l in leaves if l.scores.get("answer"))
                if votes:
                    top = votes.most_common(1)[0][0]
                    right += next(l.scores["outcome"] for l in leaves if l.scores.get("answer") == top)
            rows.append({"method": "flat_majority", "scorer": None, "n": n, "accuracy": round(right / len(flat), 4),
                         "tokens_per_problem": round(sum(sum(len(l.token_ids) for l in t.leaves()[:n]) for t in flat) / len(flat), 1)})
            print(json.dumps(rows[-1]), flush=True)

        # step searches, each scorer and aggregation
        common = dict(max_response_tokens=args.max_tokens, step_tokens=64, max_depth=16, seed=0)
        runs = [(name, how) for name in scorers for how in (search_aggregations if name == "prm" else ["min"])]
        for name, how in tqdm(runs, desc="searches"):
            scorer = scorers[name]
            for n in budgets:
                keep = max(1, n // args.expand)
                started = time.perf_counter()
                trees = list(BeamSearchSampler(BeamSettings(n=n, width=keep, aggregation=how, **common), scorer).grow(engine, fresh()))
                record("beam", name, {"aggregation": how, "n": n, "width": keep}, trees, time.perf_counter() - started)
                if n % args.expand == 0:
                    started = time.perf_counter()
                    trees = list(DVTSSampler(DVTSSettings(n=n, width=args.expand, aggregation=how, **common), scorer).grow(engine, fresh()))
                    record("dvts", name, {"aggregation": how, "n": n, "width": args.expand}, trees, time.perf_counter() - started)
            for label, widen in (("mcts", 0), ("mcts_widen", args.mcts_max_children)):
                for k in iterations:
                    settings = MCTSSettings(iterations=k, width=args.mcts_width, max_children=widen, terminal_value="scorer",
                                            aggregation=how, **{**common, "max_depth": 8})
                    sampler = MCTSSampler(settings, scorer)
                    started = time.perf_counter()
                    trees = list(sampler.grow(engine, fresh()))
                    seconds = time.perf_counter() - started
                    sims = sum(t.sampler["stats"]["simulations"] for t in trees)
                    record(label, name, {"aggregation": how, "iterations": k, "width": args.mcts_width, "max_children": widen},
                           trees, seconds, simulations_per_problem=round(sims / len(trees), 1),
                           mean_batch=round(sum(sampler.engine_calls) / max(1, len(sampler.engine_calls)), 1))

        # MCTS-DPO's training-data setting: finished nodes graded against the gold answer (not a test-time method)
        started = time.perf_counter()
        settings = MCTSSettings(iterations=2, width=args.mcts_width, aggregation="min", **{**common, "max_depth": 8})
        trees = list(MCTSSampler(settings, scorers["prm"], grader).grow(engine, fresh()))
        record("mcts_verifier (sees the gold answer)", "prm", {"aggregation": "min", "iterations": 2, "width": args.mcts_width},
               trees, time.perf_counter() - started)

        # MCTS throughput: leaves of many trees per engine call against one tree at a time (the checker
        # as scorer, so the engine dominates)
        subset = problems[: args.throughput_problems]
        settings = MCTSSettings(iterations=4, width=args.mcts_width, terminal_value="scorer", **{**common, "max_depth": 8})
        timings = {}
        for mode in ("batched", "one_tree_at_a_time"):
            sampler = MCTSSampler(settings, scorers["checker"])
            started = time.perf_counter()
            if mode == "batched":
                trees = list(sampler.grow(engine, fresh(subset)))
            else:
                trees = [t for tree in fresh(subset) for t in sampler.grow(engine, [tree])]
            seconds = time.perf_counter() - started
            sims = sum(t.sampler["stats"]["simulations"] for t in trees)
            expansions = sum(t.sampler["stats"]["expansions"] for t in trees)
            timings[mode] = {"trees": len(trees), "seconds": round(seconds, 2), "simulations": sims,
                             "simulations_per_second": round(sims / seconds, 1), "expansions_per_second": round(expansions / seconds, 1),
                             "engine_calls": len(sampler.engine_calls),
                             "mean_requests_per_call": round(sum(sampler.engine_calls) / max(1, len(sampler.engine_calls)), 1),
                             "accuracy": round(judge(trees)[0], 4)}
            print(mode, json.dumps(timings[mode]), flush=True)
        timings["speedup"] = round(timings["batched"]["simulations_per_second"] / timings["one_tree_at_a_time"]["simulations_per_second"], 2)
        result["mcts_throughput"] = {"settings": {"iterations": 4, "width": args.mcts_width, "scorer": "checker"}, **timings}

    result["table_markdown"] = table(rows)
    Path(args.output).write_text(json.dumps(result, indent=2))
    plot(rows, str(Path(args.output).with_suffix(".png")))
    print(result["table_markdown"])
    print(json.dumps(result["mcts_throughput"], indent=2))


def table(rows: list[dict]) -> str:
    lines = ["| method | scorer | aggregation | setting | tokens / problem | accuracy |", "|---|---|---|---|---|---|"]
    for r in rows:
        setting = ", ".join(f"{k}={r[k]}" for k in ("n", "width", "iterations", "max_children") if k in r)
        lines.append(f"| {r['method']} | {r.get('scorer') or '-'} | {r.get('aggregation', '-')} | {setting or '-'} | "
                     f"{r['tokens_per_problem']} | {r['accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Accuracy against tokens per problem, one line per method, a panel per scorer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorers = sorted({r["scorer"] for r in rows if r.get("scorer")})
    fig, axes = plt.subplots(1, len(scorers), figsize=(6.5 * len(scorers), 4.5), squeeze=False)
    greedy = next((r for r in rows if r["method"] == "greedy"), None)
    methods = sorted({r["method"] for r in rows if r.get("scorer")} | {"flat majority"})
    colour = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in every panel
    for ax, scorer in zip(axes[0], scorers):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r.get("scorer") == scorer and not r["method"].startswith("mcts_verifier"):
                series.setdefault(f"{r['method']} ({r.get('aggregation', '-')})", []).append((r["tokens_per_problem"], r["accuracy"]))
        for r in rows:
            if r["method"] == "flat_majority":
                series.setdefault("flat majority", []).append((r["tokens_per_problem"], r["accuracy"]))
        for label, points in sorted(series.items()):
            points.sort()
            method = label.split(" (")[0]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                    color=colour.get(method, colour["flat majority"]), linestyle="--" if "(last)" in label else "-")
        if greedy:
            ax.axhline(greedy["accuracy"], color="k", linestyle=":", label="greedy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("generated tokens per problem")
        ax.set_ylabel("accuracy")
        ax.set_title(f"arith, step scorer: {scorer}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
