"""The main job on the embedded default: the whole loop, stage by stage, with a report.

    python launch/main.py --config configs/main/arith.yaml [--field value ...]

policy (the arith tiny policy, built on first use) -> evaluation before (greedy, best-of-N) ->
TreePO trees on training problems -> PRM labels (Monte Carlo, consensus with the checker) ->
online RL from the same starting policy (TreePO: segment trees, subgroup advantages, the engine
synced every step) and its evaluation -> the fused PRM (separator head + the backbone's likelihood
of each step) -> Step-DPO pairs from the trees -> Step-DPO -> evaluation after -> report (the
offline and the online arm side by side, best-of-N with the PRM, and its F1 against the exact
checker on the evaluations' samples).
Writes to --output_dir one folder per stage and `report/report.md` (the before/after table,
TreePO's token savings, `report/accuracy_vs_n.png`, every artefact and the command that reruns
its stage alone). Run it again on the same folder to resume at the stage it stopped in.

Every stage is what one launch script does (the report lists the command that reruns it alone);
a stage is done when its folder holds `stage.json`, so a stopped run resumes at the stage it
stopped in (and the stages that sample resume inside, from their tree shards).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from treetune.data import PromptTemplate, load_problems
from treetune.data.arith import tiny_policy
from treetune.launch import best_of_n, prm_labels, step_dpo_data
from treetune.launch.main_report import f1_by_threshold, write_report
from treetune.rewards.grading import Grader
from treetune.rewards.labels.formats import read_stepwise
from treetune.rewards.outcome import score_outcomes
from treetune.rewards.scorers import load_scorer
from treetune.rollouts.run import RolloutArgs, default_prompt_style, make_engine, run_rollout
from treetune.data.arith.policies import recipe_path
from treetune.trainers.common import METRICS_FILE, load_tokenizer, parse_config, parse_recipe, setup_logging
from treetune.trainers.prm.fusion import split_holdout
from treetune.trainers.prm.trainer import main as train_prm
from treetune.trainers.step_dpo.trainer import main as step_dpo
from treetune.trainers.treepo.config import TreePOConfig, TreePOScriptArguments
from treetune.trainers.treepo.loop import run_treepo


@dataclass
class MainArgs:
    """The main job's recipe (configs/main/arith.yaml): the size of every stage and the recipes of
    the two models it trains, the PRM and the Step-DPO policy."""

    output_dir: str = field(default="outputs/main", metadata={
        "help": "Folder of the run: one subfolder per stage and report/report.md; run again on it to resume."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Starting policy (a hub name or a local checkpoint); empty: the arith tiny policy, built on first use."})
    prompt_style: str | None = field(default=None, metadata={
        "help": "How every stage renders a problem for the policy: bare, plain or chat; empty: bare for the arith "
                "tiny policy, the model's chat template when it has one (an instruct model), else plain."})
    max_tokens: int = field(default=128, metadata={"help": "Most tokens of a sampled solution, in every stage that samples."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling, labelling and training."})
    report_to: str = field(default="none", metadata={
        "help": "none, wandb or tensorboard: where the training stages log (best-of-N too, with wandb)."})
    # evaluation (before and after): greedy on eval_problems, best-of-N on bon_problems
    eval_problems: int = field(default=500, metadata={
        "help": "Arith test problems decoded greedily, before and after Step-DPO."})
    bon_problems: int = field(default=200, metadata={
        "help": "Arith test problems of the best-of-N evaluation (and of the PRM's F1), before and after Step-DPO."})
    n: int = field(default=16, metadata={
        "help": "Samples per problem in the best-of-N evaluation; the sweep runs N = 1, 2, 4, ... up to it."})
    # TreePO trees on training problems
    train_problems: int = field(default=1000, metadata={
        "help": "Arith training problems grown into TreePO trees (the source of Step-DPO pairs and PRM labels)."})
    trajectories: int = field(default=16, metadata={"help": "Trajectories (leaves) per TreePO tree."})
    segment_tokens: int = field(default=8, metadata={"help": "Tokens per TreePO segment (one tree node)."})
    max_depth: int = field(default=16, metadata={"help": "Most segments on a TreePO path."})
    branch: int = field(default=2, metadata={"help": "Children a TreePO node forks into."})
    init_divergence: int = field(default=2, metadata={"help": "TreePO forks at the root, before the first segment."})
    # PRM: MC labels from the trees (consensus with the exact checker), then the fused PRM
    prm_trees: int = field(default=600, metadata={
        "help": "TreePO trees whose trajectories get Monte Carlo step labels for the PRM."})
    prm_k: int = field(default=4, metadata={
        "help": "Completions per step prefix for the Monte Carlo labels (the tree's own first, then fresh samples)."})
    prm_truncate: bool = field(default=False, metadata={
        "help": "Drop the labels after a solution's first wrong step (Qwen's convention). The fused recipe keeps "
                "them for the head; its fusion fit stops at the first wrong step either way."})
    prm_epochs: float = field(default=3.0, metadata={"help": "Epochs of the PRM's separator head."})
    prm_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the PRM's separator head."})
    prm_fusion: bool = field(default=True, metadata={
        "help": "Fuse the separator head with the backbone's likelihood of each step, fitted on MC labels held "
                "out from the head (the recipe of configs/train_prm/arith.yaml). false: the head alone, which "
                "on arith selects far worse than majority voting."})
    prm_fusion_holdout: float = field(default=0.1, metadata={
        "help": "Share of the PRM's labelled solutions held out from the head: the fusion is fitted on them and "
                "the step threshold of the PRM's F1 is chosen on them."})
    # Step-DPO on the trees' branching-node pairs
    pair_margin: float = field(default=0.5, metadata={
        "help": "Least value gap between the chosen and the rejected step of a Step-DPO pair."})
    dpo_beta: float = field(default=0.5, metadata={"help": "Step-DPO's beta: how strongly it is held to the starting policy."})
    dpo_learning_rate: float = field(default=5e-6, metadata={"help": "Step-DPO's learning rate."})
    dpo_epochs: float = field(default=1.0, metadata={"help": "Step-DPO's epochs over the pairs."})
    dpo_batch_size: int = field(default=16, metadata={"help": "Step-DPO pairs per device and optimizer step."})
    # the online arm: TreePO RL (configs/treepo/arith.yaml) from the same starting policy
    rl_steps: int = field(default=40, metadata={
        "help": "Optimizer steps of the online arm (TreePO RL with configs/treepo/arith.yaml: 16 trees of 8 leaves a "
                "step, subgroup advantages), from the starting policy, evaluated like the Step-DPO arm; 0: no online arm."})
    rl_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the online arm."})
    rl_trees_per_step: int = field(default=16, metadata={
        "help": "Prompts (one tree each) per optimizer step of the online arm, in two micro-batches."})
    rl_generations: int = field(default=8, metadata={"help": "Finished leaves per tree (GRPO's G) of the online arm."})
    rl_sampler: str = field(default="treepo", metadata={
        "help": "How the online arm grows rollouts: treepo (segment trees) or flat (plain GRPO sampling)."})
    rl_advantage: str = field(default="subgroup", metadata={
        "help": "The online arm's advantages: subgroup (TreePO), grpo (group baseline) or segment."})


STAGES = ("policy", "eval_before", "trees", "prm_labels", "treepo", "eval_treepo", "prm", "pairs", "step_dpo",
          "eval_after", "report")
RL_RECIPE = "treepo/arith.yaml"


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
        self._engine = None

    def policy_engine(self):
        """One engine on the starting policy, shared by the stages that sample it (an engine start is
        tens of seconds on a CPU); closed once the last of them is done."""
        if self._engine is None:
            model = self.state["policy"]["model"]
            self._engine = make_engine(RolloutArgs(model_name_or_path=model, prompt_style=_style(self)), model,
                                       seed=self.args.seed)
        return self._engine

    def close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def run(self, stages: Callable[[str], dict], progress: bool = True) -> dict:
        from tqdm.auto import tqdm

        bar = tqdm(STAGES, desc="main job", unit="stage", disable=not progress)
        try:
            for stage in bar:
                bar.set_postfix_str(stage)
                marker = self.dir(stage) / "stage.json"
                if marker.exists():
                    self.state[stage] = json.loads(marker.read_text())
                    continue
                self.dir(stage).mkdir(parents=True, exist_ok=True)
                started = time.time()
                result = stages(stage)
                if stage == POLICY_SAMPLING_STAGES[-1]:
                    self.close_engine()  # the training stages need the memory and the cores
                result["seconds"] = round(time.time() - started, 1)
                marker.write_text(json.dumps(result, indent=2, default=str))
                self.state[stage] = result
        finally:
            self.close_engine()
        return self.state


def run_main(args: MainArgs, progress: bool = True) -> dict:
    """Run (or resume) the main job; returns each stage's record (command, outputs, figures)."""
    pipeline = Pipeline(args)
    (pipeline.out / "config.json").write_text(json.dumps(asdict(args), indent=2))
    return pipeline.run(lambda stage: STAGE_FUNCTIONS[stage](pipeline), progress)


# --- the stages -------------------------------------------------------------------------------

def _policy(p: Pipeline) -> dict:
    """The starting policy and the prompt style every stage asks it in."""
    path = p.args.model_name_or_path or tiny_policy()
    # one prompt style for every stage: an instruct model is asked in its own chat template
    style = default_prompt_style(p.args.prompt_style, bool(p.args.model_name_or_path), load_tokenizer(path))
    return {"model": path, "prompt_style": style,
            "command": "python -c 'from treetune.data.arith import tiny_policy; print(tiny_policy())'"}


def _style(p: Pipeline) -> str:
    """The policy's prompt style (bare in runs from before the field existed)."""
    return p.state["policy"].get("prompt_style", "bare")


def _eval_args(p: Pipeline, stage: str, model: str):
    """The best-of-N job's arguments for an evaluation stage (greedy on eval_problems, best-of-N on bon_problems)."""
    a = p.args
    return best_of_n.BestOfNArgs(output_dir=str(p.dir(stage)), model_name_or_path=model, source="arith", split="test",
                       limit=a.bon_problems, n=a.n, max_tokens=a.max_tokens, seed=a.seed, selectors="first,majority",
                       greedy_limit=a.eval_problems, prompt_style=_style(p),
                       report_to="wandb" if a.report_to == "wandb" else "none")


def _evaluate(p: Pipeline, stage: str, model: str, engine=None) -> dict:
    """Greedy and best-of-N on the test problems (`launch/best_of_n.py`), with `engine` if given."""
    eval_args = _eval_args(p, stage, model)
    metrics = best_of_n.run(eval_args, engine)
    return {"command": command("launch/best_of_n.py", eval_args), "model": model,
            "greedy": metrics["greedy"]["accuracy"], "trees": str(p.dir(stage) / "trees")}


def _eval_before(p: Pipeline) -> dict:
    return _evaluate(p, "eval_before", p.state["policy"]["model"], p.policy_engine())


def _eval_after(p: Pipeline) -> dict:
    return _evaluate(p, "eval_after", p.state["step_dpo"]["model"])


def _trees(p: Pipeline) -> dict:
    """TreePO trees on the training problems, graded (`launch/rollout.py`)."""
    a = p.args
    rollout = RolloutArgs(output_dir=str(p.dir("trees")), model_name_or_path=p.state["policy"]["model"], source="arith",
                          split="train", limit=a.train_problems, prompt_style=_style(p), sampler="treepo",
                          trajectories=a.trajectories, max_tokens=a.max_tokens, seed=a.seed, segment_tokens=a.segment_tokens,
                          max_depth=a.max_depth, branch=a.branch, init_divergence=a.init_divergence)
    problems = load_problems("arith", "train", limit=a.train_problems, seed=0)
    engine = p.policy_engine()
    with Grader() as grader:
        summary = run_rollout(rollout, engine, engine.tokenizer, problems, PromptTemplate(style=_style(p)),
                              lambda trees: score_outcomes(trees, grader))
    flat_tokens = summary["trajectories"] * summary["trajectory_tokens_mean"]
    return {"command": command("launch/rollout.py", rollout), "trees": str(p.dir("trees") / "trees"),
            "problems": summary["problems"], "trajectories": summary["trajectories"],
            "decoded_tokens": summary["decoded_tokens"], "flat_equivalent_tokens": round(flat_tokens),
            "tokens_saved_share": 1.0 - summary["decoded_tokens"] / max(1.0, flat_tokens),
            "trajectory_accuracy": summary.get("trajectory_accuracy"), "pass_at_all": summary.get("pass_at_all"),
            "prefix_cache_hit_rate": summary.get("prefix_cache_hit_rate")}


def _prm_labels(p: Pipeline) -> dict:
    """Monte Carlo step labels from the trees, kept where they agree with the exact checker (`launch/prm_labels.py`)."""
    a = p.args
    label_args = prm_labels.PRMLabelArgs(output_dir=str(p.dir("prm_labels")), trees_path=p.state["trees"]["trees"],
                              model_name_or_path=p.state["policy"]["model"], k=a.prm_k, consensus="arith_checker",
                              limit_trees=a.prm_trees, truncate=a.prm_truncate, max_tokens=a.max_tokens, seed=a.seed)
    summary = prm_labels.run(label_args, p.policy_engine())
    return {"command": command("launch/prm_labels.py", label_args), **summary}


def _prm(p: Pipeline) -> dict:
    """The PRM of configs/train_prm/arith.yaml: a separator head on the policy's backbone fused with
    the backbone's likelihood of each step, the fusion fitted on labelled solutions held out from the
    head; on those held-out solutions, whose consensus labels equal the checker's, the step threshold
    of the PRM's F1 is chosen (the report's F1 on test samples uses it). `--prm_fusion false`: the
    head alone, threshold 0.5."""

    a = p.args
    labels_file = p.state["prm_labels"]["labels_file"]
    argv = ["--train_file", labels_file, "--model_name_or_path", p.state["policy"]["model"],
            "--output_dir", str(p.dir("prm") / "model"), "--max_length", "256",
            "--num_train_epochs", str(a.prm_epochs), "--learning_rate", str(a.prm_learning_rate),
            "--per_device_train_batch_size", "32", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
            "--logging_steps", "10", "--save_strategy", "no", "--report_to", a.report_to, "--seed", str(a.seed),
            "--disable_tqdm", "false", "--likelihood_fusion", str(a.prm_fusion).lower(),
            "--fusion_holdout", str(a.prm_fusion_holdout)]
    model = train_prm(argv)
    metrics = _trainer_metrics(Path(model))
    record = {"command": argv_command("launch/train_prm.py", argv), "model": str(model), "kind": "head",
              "records": metrics["records"], "epochs": a.prm_epochs,
              "final_loss": metrics["loss_history"][-1] if metrics["loss_history"] else None, "threshold": 0.5}
    if a.prm_fusion:
        fusion = metrics["fusion"]
        record.update(kind="fused", fusion_records=metrics["fusion_records"],
                      fusion={k: fusion[k] for k in ("features", "weights", "bias", "fit_steps", "fit_loss", "prior_loss")})
        # the trainer's own split (same share and seed): the solutions the head never saw
        _, held = split_holdout(read_stepwise(labels_file), a.prm_fusion_holdout, a.seed)
        cases = ([r["prompt"].removesuffix("\n") for r in held], [r["completions"] for r in held],
                 [next((i for i, label in enumerate(r["labels"]) if float(label) < 0.5), -1) for r in held])
        by_threshold = f1_by_threshold(load_scorer(str(model), "treetune", step_mode="line"), *cases)
        threshold = max(by_threshold, key=lambda t: by_threshold[t]["f1"])
        record.update(threshold=float(threshold), held_out={"solutions": len(held), **by_threshold[threshold]})
    return record


def _trainer_metrics(model_dir: Path) -> dict:
    """The PRM trainer's run figures (records, losses, the fusion fit) from its output folder."""
    path = model_dir / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: the PRM trainer wrote no metrics (expected {METRICS_FILE} next to the model)")
    return json.loads(path.read_text())


def _pairs(p: Pipeline) -> dict:
    """Step-DPO pairs at the trees' branching nodes (`launch/step_dpo_data.py --trees_path`)."""
    data_args = step_dpo_data.StepDPODataArgs(output_dir=str(p.dir("pairs")), trees_path=p.state["trees"]["trees"],
                                              margin=p.args.pair_margin)
    summary = step_dpo_data.run(data_args)
    return {"command": command("launch/step_dpo_data.py", data_args), **summary}


def _step_dpo(p: Pipeline) -> dict:
    """Step-DPO on those pairs from the starting policy (`launch/step_dpo.py`)."""
    a = p.args
    if not p.state["pairs"]["pairs"]:
        raise RuntimeError(f"the trees gave no Step-DPO pairs ({p.state['pairs']['why_no_pairs']}): delete "
                           f"{p.dir('pairs')} and run again with a lower --pair_margin (the run resumes there), or "
                           "grow more trees in a fresh --output_dir (--train_problems, --trajectories, --max_tokens)")
    argv = ["--pairs", p.state["pairs"]["pairs_file"], "--model_name_or_path", p.state["policy"]["model"],
            "--output_dir", str(p.dir("step_dpo") / "model"), "--beta", str(a.dpo_beta),
            "--learning_rate", str(a.dpo_learning_rate), "--num_train_epochs", str(a.dpo_epochs),
            "--per_device_train_batch_size", str(a.dpo_batch_size), "--max_length", "256", "--max_prompt_length", "192",
            "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1", "--logging_steps", "10", "--save_strategy", "no",
            "--report_to", a.report_to, "--seed", str(a.seed), "--prompt_style", _style(p)]
    model = step_dpo(argv)
    metrics = json.loads((Path(model) / "metrics.json").read_text())
    return {"command": argv_command("launch/step_dpo.py", argv), "model": str(model), "steps": metrics["steps"],
            "pairs": metrics["pairs"], "padding_share": metrics["padding_share"],
            "pair_tokens_per_second": metrics["pair_tokens_per_second"], "loss_history": metrics["loss_history"]}


def _rl_argv(p: Pipeline) -> list[str]:
    a = p.args
    return ["--config", str(recipe_path(RL_RECIPE)), "--output_dir", str(p.dir("treepo") / "model"),
            "--model_name_or_path", p.state["policy"]["model"], "--prompt_style", _style(p),
            "--max_steps", str(a.rl_steps), "--learning_rate", str(a.rl_learning_rate), "--sampler", a.rl_sampler,
            "--num_generations", str(a.rl_generations), "--gradient_accumulation_steps", "2",
            "--per_device_train_batch_size", str(_half(a.rl_trees_per_step * a.rl_generations)),
            "--advantage", a.rl_advantage, "--max_completion_length", str(a.max_tokens), "--seed", str(a.seed),
            "--eval_problems", "0", "--report_to", a.report_to, "--disable_tqdm", "false"]


def _half(rows: int) -> int:
    if rows % 2:
        raise ValueError(f"--rl_trees_per_step x --rl_generations = {rows} rows a step must be even (two micro-batches)")
    return rows // 2


def _treepo(p: Pipeline) -> dict:
    """Online RL from the starting policy (`launch/treepo.py`): trees grown by the shared engine, which
    takes the trainer's weights before every generation; evaluated by the next stage."""
    if p.args.rl_steps <= 0:
        return {"skipped": True, "why": "--rl_steps 0"}
    from trl import ModelConfig

    argv = _rl_argv(p)
    args, config, model_args = parse_recipe((TreePOScriptArguments, TreePOConfig, ModelConfig), argv)
    metrics = run_treepo(args, config, model_args, engine=p.policy_engine())
    rewards = [h["reward"] for h in metrics["history"] if "reward" in h]
    return {"command": argv_command("launch/treepo.py", argv), "model": config.output_dir, "steps": metrics["steps"],
            "sampler": metrics["sampler"], "advantage": metrics["advantage"],
            "reward_first_steps": sum(rewards[:5]) / max(len(rewards[:5]), 1),
            "reward_last_steps": sum(rewards[-5:]) / max(len(rewards[-5:]), 1),
            **{k: metrics[k] for k in ("trees", "trajectories", "decoded_tokens", "decoded_share_of_rows",
                                       "trajectories_per_rollout_second", "rollout_seconds", "sync_seconds",
                                       "sync_share_of_step_time", "seconds_per_step", "train_seconds")}}


def _eval_treepo(p: Pipeline) -> dict:
    """The online arm's policy, evaluated as the Step-DPO arm is (on the shared engine, given its weights)."""
    if p.state["treepo"].get("skipped"):
        return {"skipped": True, "why": p.state["treepo"]["why"]}
    model = p.state["treepo"]["model"]
    engine = p.policy_engine()
    engine.update_weights(folder=model)  # resumed here, the engine serves the start policy
    return _evaluate(p, "eval_treepo", model, engine)


def _report(p: Pipeline) -> dict:
    """The before/after report (`report/report.md`)."""
    return write_report(p)


# the stages that sample the starting policy, in order: they share one engine (Pipeline.policy_engine)
POLICY_SAMPLING_STAGES = ("eval_before", "trees", "prm_labels", "treepo", "eval_treepo")

STAGE_FUNCTIONS: dict[str, Callable[[Pipeline], dict]] = {
    "policy": _policy, "eval_before": _eval_before, "trees": _trees, "prm_labels": _prm_labels, "prm": _prm,
    "treepo": _treepo, "eval_treepo": _eval_treepo, "pairs": _pairs, "step_dpo": _step_dpo,
    "eval_after": _eval_after, "report": _report,
}


def main(argv: list[str] | None = None) -> dict:
    # WARNING by default: each stage's own progress bars tell how far the job is
    setup_logging(os.environ.get("TREETUNE_LOG") or "WARNING")
    (args,) = parse_config((MainArgs,), argv)
    state = run_main(args)
    print((Path(args.output_dir) / "report" / "report.md").read_text())
    return state


if __name__ == "__main__":
    main()
