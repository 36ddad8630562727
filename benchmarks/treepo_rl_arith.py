"""Online RL on the proving ground: GRPO against TreePO from the shipped tiny policy, same prompts and
number of optimizer steps, several training seeds per arm, greedy accuracy on 500 arith test problems.

    python benchmarks/treepo_rl_arith.py --output treepo_rl_arith.json [--arms grpo,treepo_fixed]
        [--seeds 0,1,2] [--steps 40] [--workdir DIR] [--offline step_dpo.json,mcts_dpo.json]

Arms (each `launch/treepo.py --config configs/treepo/arith.yaml` plus overrides, one engine shared
by all runs, which is reset to the start policy before each):
- grpo: flat sampling, TRL's group baseline (configs/treepo/grpo_arith.yaml);
- grpo_treepo_sampling: TreePO's fixed-fork trees, group baseline (the paper's "GRPO w/ TreePO sampling");
- treepo_fixed / treepo_coupled: TreePO trees with subgroup advantages, fixed or coupled forks;
- trl_colocate: TRL's own GRPOTrainer with `use_vllm=True, vllm_mode="colocate"`, as the reference;
  the arm records whether it ran here and, if not, the error.
Targets (issue 23): GRPO gains >= 20 points over the start; TreePO reaches GRPO's accuracy (mean
over seeds, within 1 point or above) with <= 0.65x the decoded tokens and >= 1.3x the rollout
trajectories per second; weight sync <= 5% of step time. `--offline` reads Step-DPO and MCTS-DPO
benchmark JSONs from the same start for the accuracy-against-wall-time plot. Every run keeps its
folder under `--workdir`, so a rerun skips finished runs. Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/treepo/arith.yaml"

ARMS: dict[str, list[str]] = {
    "grpo": ["--sampler", "flat", "--advantage", "grpo"],
    "grpo_treepo_sampling": ["--sampler", "treepo", "--fork", "fixed", "--advantage", "grpo"],
    "treepo_fixed": ["--sampler", "treepo", "--fork", "fixed", "--advantage", "subgroup"],
    "treepo_coupled": ["--sampler", "treepo", "--fork", "coupled", "--segment_tokens", "32", "--advantage", "subgroup"],
}


def run_arm(name: str, seed: int, out: Path, a, engine) -> dict:
    from treetune.trainers.common import parse_recipe
    from treetune.trainers.treepo.config import TreePOConfig, TreePOScriptArguments
    from treetune.trainers.treepo.loop import run_treepo
    from trl import ModelConfig

    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    argv = ["--config", str(RECIPE), "--output_dir", str(out), "--seed", str(seed), "--max_steps", str(a.steps),
            "--eval_problems", str(a.eval_problems), "--disable_tqdm", "true", *ARMS[name], *a.extra]
    args, config, model_args = parse_recipe((TreePOScriptArguments, TreePOConfig, ModelConfig), argv)
    started = time.perf_counter()
    metrics = run_treepo(args, config, model_args, engine=engine)
    metrics["wall_seconds"] = time.perf_counter() - started
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def trl_colocate(out: Path, a, engine) -> dict:
    """TRL's own GRPOTrainer with its colocated vLLM (`use_vllm=True, vllm_mode="colocate"`) on the
    GRPO arm's recipe, evaluated with the benchmark's engine; or the reason it cannot run here."""
    import os

    from datasets import Dataset
    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import tiny_policy
    from treetune.rewards.evaluation.greedy import greedy_eval
    from treetune.rewards.grading import grade_many
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    if (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    # a single process "launched": vLLM's external launcher (colocate mode) reads the torch.distributed env
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29513")):
        os.environ.setdefault(key, value)
    path = tiny_policy()
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = PromptTemplate(style="bare")
    problems = load_problems("arith", "train", limit=4096)
    answers = {template.render(p.question, tokenizer): p.answer for p in problems}

    def outcome(prompts, completions, **_):
        return [1.0 if ok else 0.0 for ok in grade_many(list(completions), [answers[p] for p in prompts])]

    config = GRPOConfig(output_dir=str(out), use_vllm=True, vllm_mode="colocate", max_steps=a.steps, num_generations=8,
                        per_device_train_batch_size=64, gradient_accumulation_steps=2, max_completion_length=128,
                        learning_rate=1e-4, lr_scheduler_type="constant", loss_type="dapo", epsilon_high=0.28,
                        report_to="none", logging_steps=1, save_strategy="no", bf16=False,
                        vllm_gpu_memory_utilization=0.1, disable_tqdm=True)
    started = time.perf_counter()
    try:
        trainer = GRPOTrainer(model=path, reward_funcs=outcome, args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": text} for text in answers]))
        trainer.train()
        trainer.save_model(str(out / "model"))
    except Exception as error:  # noqa: BLE001 - the arm reports why it cannot run
        result = {"ran": False, "error": f"{type(error).__name__}: {error}"[:2000],
                  "where": traceback.format_exc().splitlines()[-8:]}
    else:
        seconds = time.perf_counter() - started
        engine.update_weights(folder=str(out / "model"))
        after, _ = greedy_eval(engine, tokenizer, load_problems("arith", "test", limit=a.eval_problems), template,
                               max_tokens=128, progress=False)
        result = {"ran": True, "train_seconds": seconds, "seconds_per_step": seconds / max(a.steps, 1),
                  "greedy_after": after, "rewards": [h["reward"] for h in trainer.state.log_history if "reward" in h]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def summarise(runs: dict[str, list[dict]], start: float | None) -> dict:
    out = {}
    for arm, metrics in runs.items():
        after = [m["greedy_after"]["accuracy"] for m in metrics if m.get("greedy_after")]
        steps = [m.get("steps", 0) for m in metrics]
        out[arm] = {
            "seeds": len(metrics),
            "greedy_after": after,
            "greedy_after_mean": sum(after) / len(after) if after else None,
            "gain_points": round(100 * (sum(after) / len(after) - start), 1) if after and start is not None else None,
            "decoded_tokens_mean": sum(m["decoded_tokens"] for m in metrics) / len(metrics),
            "decoded_share_of_rows": sum(m["decoded_share_of_rows"] for m in metrics) / len(metrics),
            "trajectories_per_rollout_second": sum(m["trajectories_per_rollout_second"] for m in metrics) / len(metrics),
            "seconds_per_step": sum(m["seconds_per_step"] for m in metrics) / len(metrics),
            "rollout_seconds_per_step": sum(m["rollout_seconds"] / max(s, 1) for m, s in zip(metrics, steps)) / len(metrics),
            "sync_share_of_step_time": sum(m["sync_share_of_step_time"] for m in metrics) / len(metrics),
            "masked_trees": sum(m["masked_trees"] for m in metrics),
        }
    return out


def step_table(summary: dict) -> list[dict]:
    """Every arm's wall time per optimizer step, split into rollout, sync and the rest."""
    return [{"arm": arm, "seconds_per_step": round(s["seconds_per_step"], 2),
             "rollout_seconds_per_step": round(s["rollout_seconds_per_step"], 2),
             "sync_share_of_step_time": round(s["sync_share_of_step_time"], 4)} for arm, s in summary.items()]


def verdict(summary: dict) -> dict:
    grpo = summary.get("grpo")
    result = {}
    if grpo and grpo["gain_points"] is not None:
        result["grpo_gain_points"] = grpo["gain_points"]
        result["grpo_gain_target_met (>= +20)"] = grpo["gain_points"] >= 20
    for arm in ("treepo_fixed", "treepo_coupled"):
        tree = summary.get(arm)
        if not (grpo and tree and tree["greedy_after_mean"] is not None and grpo["greedy_after_mean"] is not None):
            continue
        tokens = tree["decoded_tokens_mean"] / grpo["decoded_tokens_mean"]
        speed = tree["trajectories_per_rollout_second"] / grpo["trajectories_per_rollout_second"]
        gap = 100 * (tree["greedy_after_mean"] - grpo["greedy_after_mean"])
        result[arm] = {"accuracy_minus_grpo_points": round(gap, 1), "accuracy_target_met (>= -1)": gap >= -1.0,
                       "decoded_tokens_vs_grpo": round(tokens, 3), "tokens_target_met (<= 0.65x)": tokens <= 0.65,
                       "trajectories_per_second_vs_grpo": round(speed, 2), "speed_target_met (>= 1.3x)": speed >= 1.3}
    result["sync_target_met (<= 5% of step time)"] = all(s["sync_share_of_step_time"] <= 0.05 for s in summary.values())
    return result


def plot(summary: dict, runs: dict, offline: list[dict], path: Path, start: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, metrics in runs.items():
        points = [(m["train_seconds"] / 60, m["greedy_after"]["accuracy"] * 100) for m in metrics if m.get("greedy_after")]
        if points:
            ax.scatter(*zip(*points), label=arm)
    for item in offline:
        ax.scatter([item["minutes"]], [item["accuracy"] * 100], marker="s", label=item["name"])
    if start is not None:
        ax.axhline(start * 100, color="grey", linestyle="--", label="start")
    ax.set(xlabel="training wall time (min, 2 CPU cores)", ylabel="greedy accuracy, 500 arith test problems (%)",
           title="online RL vs offline methods from the tiny policy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def offline_points(paths: list[str]) -> list[dict]:
    """(name, minutes, accuracy) from Step-DPO / MCTS-DPO benchmark JSONs, where they say it."""
    points = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for name, variant in (data.get("variants") or {}).items():  # mcts_dpo_arith.py
            minutes = 0.0
            for r in variant.get("rounds", []):
                minutes += (r["search_seconds"] + r["train_seconds"]) / 60
                points.append({"name": f"mcts_dpo {name} r{r['round']}", "minutes": minutes,
                               "accuracy": r["greedy_accuracy"]})
        for name in ("step_dpo", "dpo_whole_solutions"):  # step_dpo_arith.py: pair building + training per seed
            pair_seconds = (data.get("pairs") or {}).get("seconds", 0.0)
            for run in (data.get(name) or {}).get("runs", []):
                points.append({"name": name, "minutes": (pair_seconds + run["seconds"]) / 60,
                               "accuracy": run["greedy_accuracy_after"]})
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--workdir", default="outputs/bench_treepo_rl")
    parser.add_argument("--arms", default="grpo,grpo_treepo_sampling,treepo_fixed,treepo_coupled,trl_colocate")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval_problems", type=int, default=500)
    parser.add_argument("--offline", default="", help="comma-separated Step-DPO / MCTS-DPO benchmark JSONs")
    parser.add_argument("extra", nargs="*", help="more recipe overrides for every arm, after --")
    a = parser.parse_args()
    from treetune.data.arith import policy_build, tiny_policy
    from treetune.rollouts.engines import VLLMEngine

    names = [n.strip() for n in a.arms.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARMS and n != "trl_colocate"]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {', '.join([*ARMS, 'trl_colocate'])}")
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report = {"settings": {"recipe": str(RECIPE.relative_to(ROOT)), "steps": a.steps, "seeds": seeds,
                           "eval_problems": a.eval_problems, "extra": a.extra, "arms": {n: ARMS.get(n) for n in names}},
              "start_policy": policy_build()}
    runs: dict[str, list[dict]] = {}
    engine = VLLMEngine(tiny_policy())
    try:
        for name in [n for n in names if n in ARMS]:
            for seed in seeds:
                metrics = run_arm(name, seed, work / f"{name}_seed{seed}", a, engine)
                runs.setdefault(name, []).append(metrics)
                start = metrics["greedy_before"]["accuracy"] if metrics.get("greedy_before") else None
                report["start_greedy"] = start
                report["summary"] = summarise(runs, start)
                report["verdict"] = verdict(report["summary"])
                report["step_table"] = step_table(report["summary"])
                Path(a.output).write_text(json.dumps(report, indent=2))
        if "trl_colocate" in names:
            report["trl_colocate"] = trl_colocate(work / "trl_colocate", a, engine)
    finally:
        engine.close()
    start = report.get("start_greedy")
    offline = offline_points([p for p in a.offline.split(",") if p.strip()])
    report["offline"] = offline
    plot(report.get("summary", {}), runs, offline, Path(a.output).with_suffix(".png"), start)
    Path(a.output).write_text(json.dumps(report, indent=2))
    print(json.dumps({"summary": report.get("summary"), "verdict": report.get("verdict")}, indent=2))


if __name__ == "__main__":
    main()
