"""TreePO against flat sampling on the same engine and budget (16 trajectories per problem).

    python benchmarks/rollout_efficiency.py --output rollout_efficiency.json [--problems 200]

For each sampler: decoded tokens per finished trajectory, finished trajectories per second, and
maj@16 / pass@16 (answers graded with math-verify; majority over extracted answers, exact for
arith's integers). Several TreePO settings run in the same process, each against the flat
baseline; targets (issue): tokens per trajectory <= 0.65x flat, trajectories per second >= 1.3x
flat, maj@16 and pass@16 within 2 points of flat.
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
}


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
    return {"maj_at_n": maj / len(trees), "pass_at_n": passed / len(trees)}


def run(name, sampler, engine, make_trees, grader) -> dict:
    from treetune.rewards.outcome import score_outcomes
    from treetune.rollouts.job import summarise

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
    if before and after and after["queries"] > before["queries"]:
        summary["prefix_cache_hit_rate"] = (after["hits"] - before["hits"]) / (after["queries"] - before["queries"])
    print(f"{name:>20}: {summary['decoded_tokens_per_trajectory']:.1f} tok/traj, "
          f"{summary['trajectories_per_second']:.1f} traj/s, maj {summary['maj_at_n']:.3f}, pass {summary['pass_at_n']:.3f}", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--variants", default=",".join(TREEPO_VARIANTS))
    args = parser.parse_args()

    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import tiny_policy
    from treetune.rewards.grading import Grader
    from treetune.rollouts.engines import GenerationRequest, VLLMEngine
    from treetune.rollouts.flat import FlatSampler, FlatSettings
    from treetune.rollouts.job import new_tree
    from treetune.rollouts.treepo import TreePOSampler, TreePOSettings

    problems = load_problems("arith", "test", limit=args.problems)
    template = PromptTemplate(style="bare")
    result = {"problems": len(problems), "trajectories_per_problem": args.trajectories, "runs": {}, "vs_flat": {}}
    with VLLMEngine(tiny_policy()) as engine, Grader() as grader:
        make_trees = lambda: [new_tree(p, template, engine.tokenizer) for p in problems]  # noqa: E731
        engine.generate([GenerationRequest(make_trees()[0].prompt_ids)])  # warm-up: no start-up cost in the first run
        flat = FlatSampler(FlatSettings(n=args.trajectories, max_tokens=args.max_tokens, seed=0))
        result["runs"]["flat"] = base = run("flat", flat, engine, make_trees, grader)
        # The same sampler with another seed: how far maj/pass move by chance alone.
        reseeded = FlatSampler(FlatSettings(n=args.trajectories, max_tokens=args.max_tokens, seed=1))
        result["runs"]["flat_seed1"] = other = run("flat_seed1", reseeded, engine, make_trees, grader)
        result["flat_seed_noise"] = {"maj_at_n_diff": other["maj_at_n"] - base["maj_at_n"],
                                     "pass_at_n_diff": other["pass_at_n"] - base["pass_at_n"]}
        for name in args.variants.split(","):
            settings = TreePOSettings(trajectories=args.trajectories, max_response_tokens=args.max_tokens, seed=0,
                                      **TREEPO_VARIANTS[name])
            summary = run(f"treepo_{name}", TreePOSampler(settings), engine, make_trees, grader)
            result["runs"][f"treepo_{name}"] = summary
            ratios = {
                "tokens_per_trajectory_ratio": summary["decoded_tokens_per_trajectory"] / base["decoded_tokens_per_trajectory"],
                "trajectories_per_second_ratio": summary["trajectories_per_second"] / base["trajectories_per_second"],
                "maj_at_n_diff": summary["maj_at_n"] - base["maj_at_n"],
                "pass_at_n_diff": summary["pass_at_n"] - base["pass_at_n"],
            }
            ratios["meets_targets"] = (ratios["tokens_per_trajectory_ratio"] <= 0.65 and ratios["trajectories_per_second_ratio"] >= 1.3
                                       and ratios["maj_at_n_diff"] >= -0.02 and ratios["pass_at_n_diff"] >= -0.02)
            result["vs_flat"][f"treepo_{name}"] = ratios
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["vs_flat"], indent=2))


if __name__ == "__main__":
    main()
