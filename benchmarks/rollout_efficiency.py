"""TreePO against flat sampling on the same engine and budget (16 trajectories per problem).

    python benchmarks/rollout_efficiency.py --output rollout_efficiency.json [--problems 200] [--seeds 0,1,2]

For each sampler: decoded tokens per finished trajectory, finished trajectories per second, and
maj@16 / pass@16 (answers graded with math-verify; majority over extracted answers, exact for
arith's integers). Every sampler runs once per seed in the same process (the engine stays up);
with 200 problems maj@16 moves by a few points between seeds of the same sampler, so the verdict
uses the means over seeds, and `flat_seed_noise` shows how far flat moves against itself.
Targets (issue): tokens per trajectory <= 0.65x flat, trajectories per second >= 1.3x flat,
maj@16 and pass@16 within 2 points of flat. `distinct_per_problem` (distinct solution texts per
tree) and `trajectory_accuracy` check that a tree's trajectories are as varied and as good as flat's.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

TREEPO_VARIANTS = {
    "seg8_even": dict(segment_tokens=8),
    "seg4_even": dict(segment_tokens=4, max_depth=32),
    "seg16_even": dict(segment_tokens=16),
    "seg8_logprob_low": dict(segment_tokens=8, branch=4, budget="logprob", favour="low"),
    "seg8_logprob_high": dict(segment_tokens=8, branch=4, budget="logprob", favour="high"),
    "seg8_init4": dict(segment_tokens=8, init_divergence=4),
    "seg16_init4": dict(segment_tokens=16, init_divergence=4),
    "seg8_init2to8": dict(segment_tokens=8, init_divergence=2, init_divergence_max=8),
    "seg12_init2to8": dict(segment_tokens=12, init_divergence=2, init_divergence_max=8),
    "seg16_init2to8": dict(segment_tokens=16, init_divergence=2, init_divergence_max=8),
    # coupled fork points (rollouts/treepo_coupled.py): probes of l tokens, forks where iid samples would leave them
    "coupled_seg8": dict(fork="coupled", segment_tokens=8),
    "coupled_seg16": dict(fork="coupled", segment_tokens=16),
    "coupled_seg32": dict(fork="coupled", segment_tokens=32),
    "coupled_seg16_top20": dict(fork="coupled", segment_tokens=16, coupled_top_k=20),  # less top-k mass dropped
}
DEFAULT_VARIANTS = ",".join(TREEPO_VARIANTS)
COMPARED = ("decoded_tokens_per_trajectory", "trajectories_per_second", "maj_at_n", "pass_at_n",
            "trajectory_accuracy", "distinct_per_problem")


def quality(trees) -> dict:
    maj = passed = 0
    for tree in trees:
        leaves = tree.leaves()
        answers = [l.scores.get("answer") for l in leaves]
        votes = Counter(a for a in answers if a)
        if votes:
            winner = votes.most_common(1)[0][0]
            maj += any(l.scores["outcome"] and l.scores.get("answer") == winner for l in leaves)
        passed += any(l.scores["outcome"] for l in leaves)
    distinct = sum(len({tree.path_text(l.id) for l in tree.leaves()}) for tree in trees) / len(trees)
    return {"maj_at_n": maj / len(trees), "pass_at_n": passed / len(trees), "distinct_per_problem": distinct}


def run(name, sampler, engine, make_trees, grader) -> dict:
    from treetune.rewards.outcome import score_outcomes
    from treetune.rollouts.run import summarise

    engine.reset_prefix_cache()
    before = engine.prefix_cache_stats()
    tokens_before = engine.counters.prompt_tokens
    trees = make_trees()
    started = time.perf_counter()
    trees = list(sampler.grow(engine, trees))
    seconds = time.perf_counter() - started
    after = engine.prefix_cache_stats()
    score_outcomes(trees, grader)
    summary = summarise(trees, seconds)
    summary.update(quality(trees))
    summary["prompt_tokens_sent"] = engine.counters.prompt_tokens - tokens_before
    stats = [t.sampler.get("stats") for t in trees if t.sampler.get("stats")]
    if stats:  # TreePO: engine rounds, and (coupled) zero-token copies of finished paths and dropped top-k mass
        summary["engine_rounds"] = max(x["steps"] for x in stats)
        for key in ("fallbacks", "copies", "dropped_mass"):
            if all(key in x for x in stats):
                summary[f"{key}_per_problem" if key != "dropped_mass" else key] = sum(x[key] for x in stats) / len(stats)
    if before and after and after["queries"] > before["queries"]:
        summary["prefix_cache_hit_rate"] = (after["hits"] - before["hits"]) / (after["queries"] - before["queries"])
    print(f"{name:>20}: {summary['decoded_tokens_per_trajectory']:.1f} tok/traj, "
          f"{summary['trajectories_per_second']:.1f} traj/s, maj {summary['maj_at_n']:.3f}, pass {summary['pass_at_n']:.3f}", flush=True)
    return summary


def mean(runs: list[dict], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def compare(runs: list[dict], flat: list[dict]) -> dict:
    """Means over seeds against flat's means, the per-seed figures, and the verdict on the targets."""
    out = {
        "tokens_per_trajectory_ratio": mean(runs, "decoded_tokens_per_trajectory") / mean(flat, "decoded_tokens_per_trajectory"),
        "trajectories_per_second_ratio": mean(runs, "trajectories_per_second") / mean(flat, "trajectories_per_second"),
        "maj_at_n_diff": mean(runs, "maj_at_n") - mean(flat, "maj_at_n"),
        "pass_at_n_diff": mean(runs, "pass_at_n") - mean(flat, "pass_at_n"),
        "trajectory_accuracy_diff": mean(runs, "trajectory_accuracy") - mean(flat, "trajectory_accuracy"),
        "per_seed": {key: [round(r[key], 4) for r in runs] for key in COMPARED},
    }
    out["meets"] = {"tokens": out["tokens_per_trajectory_ratio"] <= 0.65,
                    "speed": out["trajectories_per_second_ratio"] >= 1.3,
                    "maj": out["maj_at_n_diff"] >= -0.02, "pass": out["pass_at_n_diff"] >= -0.02}
    out["meets_targets"] = all(out["meets"].values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--seeds", default="0,1,2", help="every sampler runs once per seed; the verdict uses the means")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from: {', '.join(TREEPO_VARIANTS)}")
    args = parser.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in TREEPO_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(TREEPO_VARIANTS)}")

    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import policy_build, tiny_policy
    from treetune.rewards.grading import Grader
    from treetune.rollouts.engines import GenerationRequest, VLLMEngine
    from treetune.rollouts.flat import FlatSampler, FlatSettings
    from treetune.rollouts.run import new_tree
    from treetune.rollouts.treepo import TreePOSampler, TreePOSettings

    problems = load_problems("arith", "test", limit=args.problems)
    template = PromptTemplate(style="bare")
    result = {"start_policy": policy_build(), "problems": len(problems), "trajectories_per_problem": args.trajectories, "seeds": seeds,
              "variants": {n: TREEPO_VARIANTS[n] for n in names}, "runs": {}, "vs_flat": {}}
    with VLLMEngine(tiny_policy()) as engine, Grader() as grader:
        make_trees = lambda: [new_tree(p, template, engine.tokenizer) for p in problems]  # noqa: E731
        engine.generate([GenerationRequest(make_trees()[0].prompt_ids)])  # warm-up: no start-up cost in the first run
        flat = []
        for seed in seeds:
            sampler = FlatSampler(FlatSettings(n=args.trajectories, max_tokens=args.max_tokens, seed=seed))
            result["runs"][f"flat_seed{seed}"] = summary = run(f"flat_seed{seed}", sampler, engine, make_trees, grader)
            flat.append(summary)
        # Flat against itself: how far maj/pass move by chance alone (each seed against the others' mean).
        result["flat_seed_noise"] = {
            f"flat_seed{seed}": {key: flat[i][key] - mean(flat[:i] + flat[i + 1:], key) for key in ("maj_at_n", "pass_at_n")}
            for i, seed in enumerate(seeds)} if len(seeds) > 1 else {}
        result["flat_mean"] = {key: mean(flat, key) for key in COMPARED}
        for name in names:
            runs = []
            for seed in seeds:
                settings = TreePOSettings(trajectories=args.trajectories, max_response_tokens=args.max_tokens, seed=seed,
                                          **TREEPO_VARIANTS[name])
                summary = run(f"treepo_{name}_seed{seed}", TreePOSampler(settings), engine, make_trees, grader)
                result["runs"][f"treepo_{name}_seed{seed}"] = summary
                runs.append(summary)
            result["vs_flat"][f"treepo_{name}"] = compare(runs, flat)
            Path(args.output).write_text(json.dumps(result, indent=2))  # partial results survive an interruption
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: {m: v[m] for m in v if m != "per_seed"} for k, v in result["vs_flat"].items()}, indent=2))


if __name__ == "__main__":
    main()
