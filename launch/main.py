"""The main job on the embedded default: the whole loop, stage by stage, with a report.

    python launch/main.py --config configs/main/arith.yaml [--field value ...]

policy (the arith tiny policy, built on first use) -> evaluation before (greedy, best-of-N) ->
TreePO trees on training problems -> PRM labels (Monte Carlo, consensus with the checker) and a
trained PRM -> Step-DPO pairs from the trees -> Step-DPO -> evaluation after -> report.
Writes to --output_dir one folder per stage and `report/report.md` (the before/after table,
TreePO's token savings, `report/accuracy_vs_n.png`, every artefact and the command that reruns
its stage alone). Run it again on the same folder to resume at the stage it stopped in.

Every stage is what one launch script does (the report lists the command that reruns it alone);
a stage is done when its folder holds `stage.json`, so a stopped run resumes at the stage it
stopped in (and the stages that sample resume inside, from their tree shards).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from treetune.data import PromptTemplate, load_problems
from treetune.data.arith import tiny_policy
from treetune.launch import best_of_n, prm_labels
from treetune.launch.main_report import write_report
from treetune.rewards.grading import Grader
from treetune.rewards.outcome import score_outcomes
from treetune.rollouts.run import RolloutArgs, make_engine, run_rollout
from treetune.trainers.prm.train import main as train_prm
from treetune.trainers.step_dpo.pairs import StepDPODataArgs, pairs_from_trees
from treetune.trainers.step_dpo.trainer import main as step_dpo


@dataclass
class MainArgs:
    output_dir: str = "outputs/main"
    model_name_or_path: str | None = None  # empty: the arith tiny policy (built on first use)
    max_tokens: int = 128
    seed: int = 0
    report_to: str = "none"  # none | wandb | tensorboard: the training stages' logs (and best-of-N's with wandb)
    # evaluation (before and after): greedy on eval_problems, best-of-N on bon_problems
    eval_problems: int = 500
    bon_problems: int = 200
    n: int = 16
    # TreePO trees on training problems
    train_problems: int = 1000
    trajectories: int = 16
    segment_tokens: int = 8
    max_depth: int = 16
    branch: int = 2
    init_divergence: int = 2
    # PRM: MC labels from the trees (consensus with the exact checker), then training
    prm_trees: int = 300
    prm_k: int = 4
    prm_epochs: float = 4.0
    prm_learning_rate: float = 3e-4
    # Step-DPO on the trees' branching-node pairs
    pair_margin: float = 0.5
    dpo_beta: float = 0.5
    dpo_learning_rate: float = 5e-6
    dpo_epochs: float = 1.0
    dpo_batch_size: int = 16


STAGES = ("policy", "eval_before", "trees", "prm_labels", "prm", "pairs", "step_dpo", "eval_after", "report")


def command(script: str, args) -> str:
    """The launch command that reruns a stage: the fields that differ from the script's defaults."""
    parts = ["python", script]
    defaults = type(args)()
    for f in fields(args):
        value = getattr(args, f.name)
        if value != getattr(defaults, f.name) and value is not None:
            parts += [f"--{f.name}", str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def argv_command(script: str, argv: list[str]) -> str:
    return " ".join(shlex.quote(p) for p in ["accelerate", "launch", script, *argv])


class Pipeline:
    """Runs the stages in order, skipping the finished ones."""

    def __init__(self, args: MainArgs):
        self.args = args
        self.out = Path(args.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, dict] = {}

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def run(self, stages: Callable[[str], dict], progress: bool = True) -> dict:
        from tqdm.auto import tqdm

        bar = tqdm(STAGES, desc="main job", unit="stage", disable=not progress)
        for stage in bar:
            bar.set_postfix_str(stage)
            marker = self.dir(stage) / "stage.json"
            if marker.exists():
                self.state[stage] = json.loads(marker.read_text())
                continue
            self.dir(stage).mkdir(parents=True, exist_ok=True)
            started = time.time()
            result = stages(stage)
            result["seconds"] = round(time.time() - started, 1)
            marker.write_text(json.dumps(result, indent=2, default=str))
            self.state[stage] = result
        return self.state


def run_main(args: MainArgs, progress: bool = True) -> dict:
    """Run (or resume) the main job; returns each stage's record (command, outputs, figures)."""
    pipeline = Pipeline(args)
    (pipeline.out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    return pipeline.run(lambda stage: STAGE_FUNCTIONS[stage](pipeline), progress)


# --- the stages -------------------------------------------------------------------------------

def _policy(p: Pipeline) -> dict:

    path = p.args.model_name_or_path or tiny_policy()
    return {"model": path, "command": "python -c 'from treetune.data.arith import tiny_policy; print(tiny_policy())'"}


def _eval_args(p: Pipeline, stage: str, model: str):

    a = p.args
    return best_of_n.BestOfNArgs(output_dir=str(p.dir(stage)), model_name_or_path=model, source="arith", split="test",
                       limit=a.bon_problems, n=a.n, max_tokens=a.max_tokens, seed=a.seed, selectors="first,majority",
                       greedy_limit=a.eval_problems, prompt_style="bare",
                       report_to="wandb" if a.report_to == "wandb" else "none")


def _evaluate(p: Pipeline, stage: str, model: str) -> dict:

    eval_args = _eval_args(p, stage, model)
    metrics = best_of_n.run(eval_args)
    return {"command": command("launch/best_of_n.py", eval_args), "model": model,
            "greedy": metrics["greedy"]["accuracy"], "trees": str(p.dir(stage) / "trees")}


def _eval_before(p: Pipeline) -> dict:
    return _evaluate(p, "eval_before", p.state["policy"]["model"])


def _eval_after(p: Pipeline) -> dict:
    return _evaluate(p, "eval_after", p.state["step_dpo"]["model"])


def _trees(p: Pipeline) -> dict:

    a = p.args
    rollout = RolloutArgs(output_dir=str(p.dir("trees")), model_name_or_path=p.state["policy"]["model"], source="arith",
                          split="train", limit=a.train_problems, prompt_style="bare", sampler="treepo",
                          trajectories=a.trajectories, max_tokens=a.max_tokens, seed=a.seed, segment_tokens=a.segment_tokens,
                          max_depth=a.max_depth, branch=a.branch, init_divergence=a.init_divergence)
    problems = load_problems("arith", "train", limit=a.train_problems, seed=0)
    engine = make_engine(rollout, rollout.model_name_or_path)
    try:
        with Grader() as grader:
            summary = run_rollout(rollout, engine, engine.tokenizer, problems, PromptTemplate(style="bare"),
                                  lambda trees: score_outcomes(trees, grader))
    finally:
        engine.close()
    flat_tokens = summary["trajectories"] * summary["trajectory_tokens_mean"]
    return {"command": command("launch/rollout.py", rollout), "trees": str(p.dir("trees") / "trees"),
            "problems": summary["problems"], "trajectories": summary["trajectories"],
            "decoded_tokens": summary["decoded_tokens"], "flat_equivalent_tokens": round(flat_tokens),
            "tokens_saved_share": 1.0 - summary["decoded_tokens"] / max(1.0, flat_tokens),
            "trajectory_accuracy": summary.get("trajectory_accuracy"), "pass_at_all": summary.get("pass_at_all"),
            "prefix_cache_hit_rate": summary.get("prefix_cache_hit_rate")}


def _prm_labels(p: Pipeline) -> dict:

    a = p.args
    label_args = prm_labels.PRMLabelArgs(output_dir=str(p.dir("prm_labels")), trees_path=p.state["trees"]["trees"],
                              model_name_or_path=p.state["policy"]["model"], k=a.prm_k, consensus="arith_checker",
                              limit_trees=a.prm_trees, max_tokens=a.max_tokens, seed=a.seed)
    summary = prm_labels.run(label_args)
    return {"command": command("launch/prm_labels.py", label_args), **summary}


def _prm(p: Pipeline) -> dict:

    a = p.args
    argv = ["--train_file", p.state["prm_labels"]["labels_file"], "--model_name_or_path", p.state["policy"]["model"],
            "--output_dir", str(p.dir("prm") / "model"), "--max_length", "256",
            "--num_train_epochs", str(a.prm_epochs), "--learning_rate", str(a.prm_learning_rate),
            "--per_device_train_batch_size", "32", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
            "--logging_steps", "10", "--save_strategy", "no", "--report_to", a.report_to, "--seed", str(a.seed),
            "--disable_tqdm", "false"]
    model = train_prm(argv)
    metrics = json.loads((Path(model) / "train_metrics.json").read_text())
    return {"command": argv_command("launch/train_prm.py", argv), "model": str(model), "records": metrics["records"],
            "final_loss": metrics["losses"][-1] if metrics["losses"] else None}


def _pairs(p: Pipeline) -> dict:


    data_args = StepDPODataArgs(output_dir=str(p.dir("pairs")), trees_path=p.state["trees"]["trees"],
                                margin=p.args.pair_margin)
    with Grader() as grader:
        summary = pairs_from_trees(data_args, grader)
    return {"command": command("launch/step_dpo_data.py", data_args), **summary}


def _step_dpo(p: Pipeline) -> dict:

    a = p.args
    argv = ["--pairs", p.state["pairs"]["pairs_file"], "--model_name_or_path", p.state["policy"]["model"],
            "--output_dir", str(p.dir("step_dpo") / "model"), "--beta", str(a.dpo_beta),
            "--learning_rate", str(a.dpo_learning_rate), "--num_train_epochs", str(a.dpo_epochs),
            "--per_device_train_batch_size", str(a.dpo_batch_size), "--max_length", "256", "--max_prompt_length", "192",
            "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1", "--logging_steps", "10", "--save_strategy", "no",
            "--report_to", a.report_to, "--seed", str(a.seed), "--prompt_style", "bare"]
    model = step_dpo(argv)
    metrics = json.loads((Path(model) / "metrics.json").read_text())
    return {"command": argv_command("launch/step_dpo.py", argv), "model": str(model), "steps": metrics["steps"],
            "pairs": metrics["pairs"], "padding_share": metrics["padding_share"],
            "pair_tokens_per_second": metrics["pair_tokens_per_second"], "loss_history": metrics["loss_history"]}


def _report(p: Pipeline) -> dict:

    return write_report(p)


STAGE_FUNCTIONS: dict[str, Callable[[Pipeline], dict]] = {
    "policy": _policy, "eval_before": _eval_before, "trees": _trees, "prm_labels": _prm_labels, "prm": _prm,
    "pairs": _pairs, "step_dpo": _step_dpo, "eval_after": _eval_after, "report": _report,
}


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser


    logging.basicConfig(level=os.environ.get("TREETUNE_LOG", "WARNING"), format="%(asctime)s %(name)s: %(message)s")
    (args,) = TrlParser((MainArgs,)).parse_args_and_config(argv)
    state = run_main(args)
    print(open(os.path.join(args.output_dir, "report", "report.md")).read())
    return state


if __name__ == "__main__":
    main()
