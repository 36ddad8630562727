"""Step-DPO on the proving ground: pairs from the tiny policy's own samples (errors located by the
exact checker), greedy accuracy on 500 arith test problems before and after, Step-DPO against
plain DPO on whole solutions built from the same samples (same pairs, same steps), and training
throughput and padding against TRL's plain DPOTrainer on the same step pairs.

The ablation trains the whole solutions with the same trainer as the steps, so only the data
differ, as in the paper (its DPO baseline is the same training code fed the `full_chosen` /
`full_rejected` fields). TRL's stock DPOTrainer on the whole solutions (its own tokenisation,
EOS appended, unsorted batches) is reported beside it as a reference, not as the ablation.

What arith can and cannot show: a correct arith step is unique, so any correct whole solution
repeats the rejected solution's correct prefix word for word (91% of the whole chosen solutions
are the gold text itself). DPO's log-ratios of a shared prefix cancel exactly, so on arith
whole-solution DPO is DPO on the two continuations from the first error on: Step-DPO's signal plus
the rest of both solutions. The paper's case against whole solutions (the correct early steps of a
rejected answer get pushed down) needs solutions that differ before the error, which arith never
has; what the ablation measures here is only whether dropping the continuations costs accuracy.
Each arm's wrong answers are sorted by the kind and position of their first wrong step.

    python benchmarks/step_dpo_arith.py --output step_dpo_arith.json [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def train_args(out: Path, a, seed: int = 0, **extra) -> list[str]:
    argv = ["--output_dir", str(out), "--beta", str(a.beta), "--learning_rate", str(a.learning_rate),
            "--num_train_epochs", str(a.epochs), "--per_device_train_batch_size", str(a.batch_size),
            "--max_length", "256", "--logging_steps", "10", "--report_to", "none", "--save_strategy", "no",
            "--lr_scheduler_type", "cosine", "--warmup_steps", "0.1", "--seed", str(seed), "--disable_tqdm", "true"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def plain_dpo(records: list[dict], out: Path, a, policy: str, seed: int = 0) -> dict:
    """TRL's DPOTrainer as it comes (EOS appended, its own tokenisation), for the comparisons."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from treetune.trainers.step_dpo.trainer import PaddingMeter
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    config = DPOConfig(output_dir=str(out), beta=a.beta, learning_rate=a.learning_rate, num_train_epochs=a.epochs,
                       per_device_train_batch_size=a.batch_size, max_length=256, logging_steps=10, report_to=[],
                       save_strategy="no", lr_scheduler_type="cosine", warmup_steps=0.1, seed=seed, disable_tqdm=True,
                       bf16=False)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy), args=config,
                         train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    trainer.data_collator = meter = PaddingMeter(trainer.data_collator)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    return {"seconds": seconds, "pair_tokens_per_second": meter.real / seconds, "padding_share": meter.padding_share,
            "steps": trainer.state.global_step}


def greedy(model: str, problems, template) -> tuple[float, dict]:
    """Greedy accuracy on the test problems, and what the wrong answers got wrong: the kind of their
    first wrong step and its position (Step-DPO trains exactly the first-error positions)."""
    from collections import Counter

    from treetune.data.arith import error_kind_counts
    from treetune.rewards.evaluation.greedy import greedy_eval
    from treetune.rollouts.engines import VLLMEngine

    with VLLMEngine(model) as engine:
        metrics, rows = greedy_eval(engine, engine.tokenizer, problems, template, max_tokens=128, progress=False)
    positions = Counter(row["first_wrong_step"] for row in rows if not row["correct"])
    return metrics["accuracy"], {"step_accuracy": round(metrics["step_accuracy"], 4), "error_kinds": error_kind_counts(rows),
                                 "first_wrong_step": dict(sorted(positions.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--train_problems", type=int, default=1000)
    parser.add_argument("--eval_problems", type=int, default=500)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--learning_rate", type=float, default=5e-6)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--throughput_repeats", type=int, default=3)
    parser.add_argument("--throughput_only", action="store_true",
                        help="redo only the throughput comparison, updating the figures already in --output")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds for the Step-DPO vs whole-solution DPO comparison")
    parser.add_argument("--verify_chosen", action="store_true",
                        help="drop chosen steps the checker finds wrong (the paper's optional filter of chosen steps "
                             "whose continuation reached the answer by luck)")
    parser.add_argument("--no_trl_reference", action="store_true",
                        help="leave out the reference arm (TRL's stock DPOTrainer on the whole solutions)")
    a = parser.parse_args()

    from treetune.data import PromptTemplate, load_problems
    from treetune.data.arith import policy_build, tiny_policy
    from treetune.data.step_pairs import StepPair, dpo_prompt, load_step_pairs, write_step_pairs
    from treetune.rewards.grading import Grader
    from treetune.rollouts.engines import VLLMEngine
    from treetune.launch.step_dpo_data import StepDPODataArgs
    from treetune.rewards.scorers import scorer_from_args
    from treetune.trainers.step_dpo.pairs import build_pairs
    from treetune.trainers.step_dpo.trainer import main as step_dpo

    work = Path(a.workdir or tempfile.mkdtemp(prefix="step_dpo_arith_"))
    work.mkdir(parents=True, exist_ok=True)
    policy = tiny_policy()
    template = PromptTemplate(style="bare")
    result: dict = {"settings": vars(a), "start_policy": policy_build(policy)}

    data_args = StepDPODataArgs(output_dir=str(work / "pairs"), limit=a.train_problems, max_tokens=128,
                                verify_chosen=a.verify_chosen)
    started = time.perf_counter()
    with Grader() as grader, VLLMEngine(policy) as engine:
        result["pairs"] = build_pairs(data_args.output_dir, engine, grader, engine.tokenizer,
                                      load_problems("arith", "train", limit=a.train_problems), template,
                                      scorer_from_args(data_args, engine), data_args, data_args,
                                      step_mode=data_args.step_mode, batch_problems=data_args.batch_problems)
    result["pairs"]["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result["pairs"], indent=2), flush=True)
    pairs_file = result["pairs"]["pairs_file"]
    pairs, _ = load_step_pairs(pairs_file)

    if a.throughput_only:
        result = {**json.loads(Path(a.output).read_text()), **{k: v for k, v in result.items() if k != "settings"}}
    else:
        test = load_problems("arith", "test", limit=a.eval_problems)
        result["greedy_accuracy_before"], result["errors_before"] = greedy(policy, test, template)

        # Step-DPO against whole-solution DPO from the same samples (problem -> prefix + the whole
        # correct continuation against prefix + the whole wrong solution from its error on), same
        # pairs, same steps, over several training seeds: one seed's gap is within the noise of 500 problems
        whole_file = work / "whole_solution_pairs.jsonl"
        write_step_pairs([StepPair(prompt=p.prompt, initial_reason_steps="", answer=p.answer, problem_id=p.problem_id,
                                   chosen=p.initial_reason_steps + p.extra["full_chosen"],
                                   rejected=p.initial_reason_steps + p.extra["full_rejected"], step_index=0,
                                   origin="full_solution") for p in pairs], whole_file)
        whole_trl = [{"prompt": dpo_prompt(p, "bare").removesuffix(p.initial_reason_steps),
                      "chosen": p.initial_reason_steps + p.extra["full_chosen"],
                      "rejected": p.initial_reason_steps + p.extra["full_rejected"]} for p in pairs]
        arms = {"step_dpo": [], "dpo_whole_solutions": []} | ({} if a.no_trl_reference else {"trl_dpo_whole_solutions": []})

        def treetune_run(name: str, pair_file: str, seed: int) -> dict:
            started = time.perf_counter()
            out = step_dpo(["--pairs", pair_file] + train_args(work / f"{name}_seed{seed}", a, seed))
            metrics = json.loads((out / "metrics.json").read_text())
            accuracy, errors = greedy(str(out), test, template)
            return {"seed": seed, "greedy_accuracy_after": accuracy, "errors": errors,
                    "seconds": round(time.perf_counter() - started, 1), "steps": metrics["steps"]}

        for seed in range(a.seeds):
            arms["step_dpo"].append(treetune_run("step_dpo", pairs_file, seed))
            arms["dpo_whole_solutions"].append(treetune_run("dpo_whole", str(whole_file), seed))
            if "trl_dpo_whole_solutions" in arms:
                dpo = plain_dpo(whole_trl, work / f"trl_dpo_whole_seed{seed}", a, policy, seed)
                accuracy, errors = greedy(str(work / f"trl_dpo_whole_seed{seed}"), test, template)
                arms["trl_dpo_whole_solutions"].append(
                    {"seed": seed, "greedy_accuracy_after": accuracy, "errors": errors, **dpo})
            print(json.dumps({name: runs[-1] for name, runs in arms.items()}, indent=2), flush=True)
        for name, runs in arms.items():
            accs = [r["greedy_accuracy_after"] for r in runs]
            mean = sum(accs) / len(accs)
            result[name] = {"greedy_accuracy_after_mean": mean,
                            "greedy_accuracy_after_std": (sum((x - mean) ** 2 for x in accs) / len(accs)) ** 0.5, "runs": runs}

    # throughput on the same step pairs: treetune's Step-DPO trainer against TRL's DPOTrainer,
    # alternated `throughput_repeats` times and the best of each kept (this machine is shared, so a
    # single timing measures the neighbours as much as the trainer)
    step_records = [{"prompt": dpo_prompt(p, "bare"), "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    runs = {"step_dpo_trainer": [], "trl_dpo_trainer": []}
    for repeat in range(a.throughput_repeats):
        out = step_dpo(["--pairs", pairs_file] + train_args(work / "throughput_step", a))
        m = json.loads((out / "metrics.json").read_text())
        runs["step_dpo_trainer"].append({"seconds": m["train_runtime"], "padding_share": m["padding_share"],
                                         "pair_tokens_per_second": m["pair_tokens_per_second"], "steps": m["steps"]})
        runs["trl_dpo_trainer"].append(plain_dpo(step_records, work / "throughput_trl", a, policy))
    if a.throughput_repeats > 0:
        result["throughput"] = {name: {**max(r, key=lambda x: x["pair_tokens_per_second"]), "repeats": r} for name, r in runs.items()}
        result["throughput"]["speedup"] = (result["throughput"]["step_dpo_trainer"]["pair_tokens_per_second"]
                                           / result["throughput"]["trl_dpo_trainer"]["pair_tokens_per_second"])
    result["gain_points"] = round(100 * (result["step_dpo"]["greedy_accuracy_after_mean"] - result["greedy_accuracy_before"]), 1)
    for name in [n for n in ("dpo_whole_solutions", "trl_dpo_whole_solutions") if n in result]:
        result[f"step_minus_{name.removeprefix('dpo_')}_points"] = round(
            100 * (result["step_dpo"]["greedy_accuracy_after_mean"] - result[name]["greedy_accuracy_after_mean"]), 1)
    Path(a.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
