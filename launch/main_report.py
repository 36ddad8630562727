"""The main job's report: the before/after table (greedy, best-of-N with the PRM, and the PRM's F1
against the exact arith checker) with one column per arm (Step-DPO offline, TreePO RL online),
which PRM it is, TreePO's token savings, the online arm's run, the accuracy-vs-N plot before and
after, and where every artefact lies (with the command that reruns each stage)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from treetune.launch.best_of_n import BestOfNArgs, run
from treetune.rewards.evaluation.processbench import arith_cases, evaluate_splits
from treetune.rewards.scorers import load_scorer
from treetune.rollouts.tree_io import read_trees

SELECTORS = "first,majority,prm_min,prm_last,weighted_prm_min,weighted_prm_last"
PLOTTED = (("pass_at_k", "pass@N"), ("majority", "majority"), ("prm_min", "PRM (min step)"),
           ("weighted_prm_min", "PRM-weighted majority (min step)"))
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # step thresholds of the F1 sweep
PRM_KINDS = {"fused": "the fused PRM: separator head + the backbone's likelihood of each step",
             "head": "the separator head alone (no likelihood fusion)"}


def f1_by_threshold(scorer, questions: Sequence[str], solutions: Sequence[Sequence[str]],
                    labels: Sequence[int]) -> dict[str, dict]:
    """ProcessBench-style metrics (acc_err, acc_corr, F1) of a step scorer at every threshold of
    THRESHOLDS, against first-error labels (-1: every step right)."""
    sweep = evaluate_splits({"arith": scorer.score(list(questions), [list(s) for s in solutions])},
                            {"arith": list(labels)}, THRESHOLDS)
    return {threshold: cell["splits"]["arith"] for threshold, cell in sweep.items()}


def prm_f1_on_samples(scorer, trees_dir: str, threshold: float) -> dict:
    """The PRM's F1 against the exact checker on an evaluation's samples: at the threshold chosen on
    held-out training solutions, and (for reference only: chosen on these very samples) the best."""
    by_threshold = f1_by_threshold(scorer, *arith_cases(list(read_trees(trees_dir))))
    best = max(by_threshold, key=lambda t: by_threshold[t]["f1"])
    return {**by_threshold[f"{threshold:g}"], "threshold": threshold,
            "best_threshold_on_these_samples": float(best), "f1_at_that_best": by_threshold[best]["f1"]}


def score_with_prm(pipeline, which: str) -> dict:
    """Best-of-N metrics of one evaluation's samples with the trained PRM's selectors."""

    a = pipeline.args
    eval_args = BestOfNArgs(output_dir=str(pipeline.dir("report") / which), trees_path=pipeline.state[f"eval_{which}"]["trees"],
                            source="arith", split="test", limit=a.bon_problems, n=a.n, seed=a.seed, selectors=SELECTORS,
                            scorer=pipeline.state["prm"]["model"], scorer_format="treetune", step_mode="line")
    return run(eval_args)


def _curve(metrics: dict, name: str) -> list[float]:
    if name == "pass_at_k":
        return [metrics["pass_at_k"][str(n)] for n in metrics["n_values"]]
    return [metrics["selectors"][name][str(n)]["accuracy"] for n in metrics["n_values"]]


ARM_STYLES = ("--", "-", ":")  # before, then the arms


def plot_before_after(before: dict, arms: Sequence[tuple[str, dict]], path: Path, title: str) -> None:
    """Accuracy against N: one colour per selector, one line style per policy (before, then each
    arm's (label, best-of-N metrics))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, label) in enumerate(PLOTTED):
        color = f"C{i}"
        ax.plot(before["n_values"], _curve(before, name), color=color, linestyle="--", marker="o", alpha=0.6, label=f"{label}, before")
        for j, (arm, metrics) in enumerate(arms):
            ax.plot(metrics["n_values"], _curve(metrics, name), color=color, linestyle=ARM_STYLES[1 + j % 2],
                    marker="os"[j % 2], label=f"{label}, {arm}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(before["n_values"], [str(n) for n in before["n_values"]])
    ax.set_xlabel("N (samples per problem)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _row(label: str, values: Sequence[float]) -> str:
    """before, then each arm's value and its change in points."""
    cells = [f"{values[0]:.1%}"] + [f"{v:.1%} ({100 * (v - values[0]):+.1f})" for v in values[1:]]
    return f"| {label} | " + " | ".join(cells) + " |"


def _f1_row(label: str, values: Sequence[float]) -> str:
    cells = [f"{values[0]:.3f}"] + [f"{v:.3f} ({v - values[0]:+.3f})" for v in values[1:]]
    return f"| {label} | " + " | ".join(cells) + " |"


def describe_rl(record: dict, greedy: tuple[float, float]) -> str:
    """One paragraph on the online arm's run: what it trained, what it decoded, where its time went."""
    return (f"{record['steps']} optimizer steps of online RL ({record['sampler']} rollouts, {record['advantage']} "
            f"advantages) from the starting policy: {record['trees']} trees, {record['trajectories']} trajectories; "
            f"decoded {record['decoded_tokens']:,} tokens, {record['decoded_share_of_rows']:.1%} of what flat sampling "
            f"of the same rows decodes; {record['trajectories_per_rollout_second']:.0f} trajectories per rollout second. "
            f"Mean reward {record['reward_first_steps']:.3f} over the first five steps, "
            f"{record['reward_last_steps']:.3f} over the last five; greedy {greedy[0]:.1%} -> {greedy[1]:.1%}. "
            f"{record['seconds_per_step']:.1f} s a step, {record['sync_share_of_step_time']:.1%} of it weight sync "
            f"({record['train_seconds'] / 60:.1f} min of training in all).")


def describe_prm(record: dict) -> str:
    """One paragraph: which PRM the report's PRM rows use, how it was trained and thresholded."""
    kind = record.get("kind", "head")
    text = (f"**PRM: {PRM_KINDS[kind]}.** A two-class head read at each step's separator on the policy's "
            f"backbone, trained {record.get('epochs', '?')} epochs on {record['records']} solutions with Monte Carlo "
            f"step labels")
    if kind == "fused":
        fusion = record["fusion"]
        weights = ", ".join(f"{name} {w:+.3g}" for name, w in zip(fusion["features"], fusion["weights"]))
        held = record["held_out"]
        text += (f"; fused with the frozen backbone's likelihood of each step by a logistic fit on {fusion['fit_steps']} "
                 f"steps of {record['fusion_records']} solutions held out from the head (weights: {weights}; loss "
                 f"{fusion['fit_loss']:.3f} against the label prior's {fusion['prior_loss']:.3f}). A step counts as wrong "
                 f"below {record['threshold']:g}, the threshold of best F1 on those held-out solutions "
                 f"(F1 {held['f1']:.3f} on {held['solutions']}).")
    else:
        text += (f". A step counts as wrong below {record.get('threshold', 0.5):g}. On arith this head alone selects far worse "
                 "than majority voting; the default recipe (`--prm_fusion true`) fuses it with the backbone's likelihood.")
    return text


def _arms(state: dict) -> list[tuple[str, str]]:
    """(key, column label) of the arms that ran: `after` (Step-DPO), and `treepo` (online RL) unless skipped."""
    arms = [("after", "after Step-DPO")]
    if state.get("eval_treepo") and not state["eval_treepo"].get("skipped"):
        arms.append(("treepo", "after TreePO RL"))
    return arms


def write_report(pipeline) -> dict:
    """Write report/report.md, report/report.json and report/accuracy_vs_n.png; return the figures."""
    state, a = pipeline.state, pipeline.args
    out = pipeline.dir("report")
    arms = _arms(state)
    keys = ["before"] + [key for key, _ in arms]
    scored = {key: score_with_prm(pipeline, key) for key in keys}
    prm = state["prm"]
    scorer = load_scorer(prm["model"], "treetune", step_mode="line")
    f1 = {key: prm_f1_on_samples(scorer, state[f"eval_{key}"]["trees"], prm.get("threshold", 0.5)) for key in keys}
    before = scored["before"]
    n = str(before["n_values"][-1])

    def column(read) -> tuple[float, ...]:
        return tuple(read(key) for key in keys)

    def selector(name):
        return column(lambda key: scored[key]["selectors"][name][n]["accuracy"])

    table = {
        "greedy": column(lambda key: state[f"eval_{key}"]["greedy"]),
        f"majority@{n}": selector("majority"),
        f"pass@{n}": column(lambda key: scored[key]["pass_at_k"][n]),
        f"PRM best-of-{n} (min step)": selector("prm_min"),
        f"PRM best-of-{n} (last step)": selector("prm_last"),
        f"PRM-weighted majority@{n} (min step)": selector("weighted_prm_min"),
        f"PRM-weighted majority@{n} (last step)": selector("weighted_prm_last"),
    }
    f1_label = f"PRM F1 against the exact checker (threshold {prm.get('threshold', 0.5):g})"
    plot = out / "accuracy_vs_n.png"
    plot_before_after(before, [(label, scored[key]) for key, label in arms], plot,
                      f"arith test, {a.bon_problems} problems: before and after each arm")
    trees = state["trees"]
    solutions = f1["before"]["erroneous"] + f1["before"]["correct"]
    online = ("and, from the same start, online TreePO RL" if len(arms) > 1 else "")
    lines = [
        "# treetune main job: report", "",
        f"Policy `{state['policy']['model']}`, trained offline with Step-DPO on pairs from TreePO trees {online}. "
        f"Greedy on {a.eval_problems} arith test problems; best-of-N on the first {a.bon_problems}, N up to {n} "
        f"(temperature 1, {before.get('subsamples', '')} subsamples per N below the maximum). "
        f"The PRM rows use {PRM_KINDS[prm.get('kind', 'head')]}; its recipe is under *PRM and pairs*. "
        "Each arm's cell gives its change over *before* in points.", "",
        "| metric | before | " + " | ".join(label for _, label in arms) + " |", "|---" * (2 + len(arms)) + "|",
        *[_row(label, values) for label, values in table.items()],
        _f1_row(f1_label, column(lambda key: f1[key]["f1"])), "",
        f"The F1 row scores every step of the best-of-N samples ({solutions} solutions before) against the exact "
        f"arith checker, ProcessBench's way: a solution's predicted first error is its first step scoring below the "
        f"threshold. Before: acc_err {f1['before']['acc_err']:.3f} ({f1['before']['erroneous']} wrong solutions), "
        f"acc_corr {f1['before']['acc_corr']:.3f} ({f1['before']['correct']} right); the best threshold on these "
        f"samples themselves would be {f1['before']['best_threshold_on_these_samples']:g} "
        f"(F1 {f1['before']['f1_at_that_best']:.3f}).", "",
        f"![accuracy against N, before and after]({plot.name})", "",
        "## TreePO trees", "",
        f"{trees['problems']} training problems, {trees['trajectories']} trajectories; decoded "
        f"{trees['decoded_tokens']:,} tokens where flat sampling of the same trajectories decodes "
        f"{trees['flat_equivalent_tokens']:,}: **{trees['tokens_saved_share']:.1%} saved** by shared prefixes. "
        f"Trajectory accuracy {trees['trajectory_accuracy']:.1%}, problems with a correct trajectory {trees['pass_at_all']:.1%}.", "",
    ]
    if len(arms) > 1:
        lines += ["## Online arm: TreePO RL", "",
                  describe_rl(state["treepo"], (state["eval_before"]["greedy"], state["eval_treepo"]["greedy"])), ""]
    lines += [
        "## PRM and pairs", "",
        describe_prm(prm), "",
        f"PRM labels: {state['prm_labels']['solutions']} solutions from {state['prm_labels']['trees']} trees, "
        f"{state['prm_labels']['kept_after_consensus']} kept after consensus with the exact checker, "
        f"{state['prm_labels']['step_labels']} step labels ({state['prm_labels']['positive_share']:.1%} positive).",
        f"Step-DPO pairs: {state['pairs']['pairs']} from {state['pairs']['problems_with_pairs']} of "
        f"{state['pairs']['problems']} trees; trained {state['step_dpo']['steps']} steps, padding "
        f"{state['step_dpo']['padding_share']:.1%}.", "",
        "## Artefacts and how to rerun a stage", "",
        "| stage | output | seconds | rerun alone |", "|---|---|---|---|",
    ]
    for stage, record in state.items():
        where = next((record[k] for k in ("labels_file", "pairs_file", "trees", "model") if k in record), str(pipeline.dir(stage)))
        lines.append(f"| {stage} | `{where}` | {record.get('seconds', '')} | `{record.get('command', record.get('why', ''))}` |")
    lines.append(f"| report | `{out}` | | (this stage) |")
    total = sum(record.get("seconds", 0.0) for record in state.values())
    lines += ["", f"Stage time so far: {total / 60:.1f} minutes (the report's own scoring comes on top)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    figures = {"table": {k: dict(zip(keys, values)) for k, values in table.items()},
               "arms": {key: label for key, label in arms},
               "prm": {"kind": prm.get("kind", "head"), "description": PRM_KINDS[prm.get("kind", "head")],
                       "threshold": prm.get("threshold", 0.5), "f1_against_checker": f1, "held_out": prm.get("held_out")},
               "tokens_saved_share": trees["tokens_saved_share"], "stage_seconds": {k: v.get("seconds") for k, v in state.items()},
               "report": str(out / "report.md"), "plot": str(plot)}
    if len(arms) > 1:
        figures["online"] = {k: v for k, v in state["treepo"].items() if k != "command"}
    figures["table"][f1_label] = dict(zip(keys, column(lambda key: f1[key]["f1"])))
    (out / "report.json").write_text(json.dumps(figures, indent=2))
    return figures
