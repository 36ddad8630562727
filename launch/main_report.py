"""The main job's report: the before/after table, TreePO's token savings, the accuracy-vs-N plot
before and after, and where every artefact lies (with the command that reruns each stage)."""

from __future__ import annotations

import json
from pathlib import Path

from treetune.launch.best_of_n import BestOfNArgs, run

SELECTORS = "first,majority,prm_min,prm_last,weighted_prm_last"
PLOTTED = (("pass_at_k", "pass@N"), ("majority", "majority"), ("prm_last", "PRM (last step)"),
           ("weighted_prm_last", "PRM-weighted majority"))


def score_with_prm(pipeline, which: str) -> dict:
    """Best-of-N metrics of one evaluation's samples with the trained PRM's selectors."""

    a = pipeline.args
    eval_args = BestOfNArgs(output_dir=str(pipeline.dir("report") / which), trees_path=pipeline.state[f"eval_{which}"]["trees"],
                            source="arith", split="test", limit=a.bon_problems, n=a.n, seed=a.seed, selectors=SELECTORS,
                            prm_path=pipeline.state["prm"]["model"])
    return run(eval_args)


def _curve(metrics: dict, name: str) -> list[float]:
    if name == "pass_at_k":
        return [metrics["pass_at_k"][str(n)] for n in metrics["n_values"]]
    return [metrics["selectors"][name][str(n)]["accuracy"] for n in metrics["n_values"]]


def plot_before_after(before: dict, after: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, label) in enumerate(PLOTTED):
        color = f"C{i}"
        ax.plot(before["n_values"], _curve(before, name), color=color, linestyle="--", marker="o", alpha=0.6, label=f"{label}, before")
        ax.plot(after["n_values"], _curve(after, name), color=color, linestyle="-", marker="o", label=f"{label}, after")
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


def _row(label: str, before: float, after: float) -> str:
    return f"| {label} | {before:.1%} | {after:.1%} | {100 * (after - before):+.1f} |"


def write_report(pipeline) -> dict:
    """Write report/report.md, report/report.json and report/accuracy_vs_n.png; return the figures."""
    state, a = pipeline.state, pipeline.args
    out = pipeline.dir("report")
    before, after = score_with_prm(pipeline, "before"), score_with_prm(pipeline, "after")
    n = str(before["n_values"][-1])
    table = {
        "greedy": (state["eval_before"]["greedy"], state["eval_after"]["greedy"]),
        f"majority@{n}": (before["selectors"]["majority"][n]["accuracy"], after["selectors"]["majority"][n]["accuracy"]),
        f"pass@{n}": (before["pass_at_k"][n], after["pass_at_k"][n]),
        f"PRM best-of-{n} (last step)": (before["selectors"]["prm_last"][n]["accuracy"], after["selectors"]["prm_last"][n]["accuracy"]),
        f"PRM best-of-{n} (min step)": (before["selectors"]["prm_min"][n]["accuracy"], after["selectors"]["prm_min"][n]["accuracy"]),
        f"PRM-weighted majority@{n}": (before["selectors"]["weighted_prm_last"][n]["accuracy"],
                                       after["selectors"]["weighted_prm_last"][n]["accuracy"]),
    }
    plot = out / "accuracy_vs_n.png"
    plot_before_after(before, after, plot, f"arith test, {a.bon_problems} problems: before and after Step-DPO")
    trees = state["trees"]
    lines = [
        "# treetune main job: report", "",
        f"Policy `{state['policy']['model']}`, trained with Step-DPO on pairs from TreePO trees. "
        f"Greedy on {a.eval_problems} arith test problems; best-of-N on the first {a.bon_problems}, N up to {n} "
        f"(temperature 1, {before.get('subsamples', '')} subsamples per N below the maximum).", "",
        "| metric | before | after | change (points) |", "|---|---|---|---|",
        *[_row(label, b, f) for label, (b, f) in table.items()], "",
        f"![accuracy against N, before and after]({plot.name})", "",
        "## TreePO trees", "",
        f"{trees['problems']} training problems, {trees['trajectories']} trajectories; decoded "
        f"{trees['decoded_tokens']:,} tokens where flat sampling of the same trajectories decodes "
        f"{trees['flat_equivalent_tokens']:,}: **{trees['tokens_saved_share']:.1%} saved** by shared prefixes. "
        f"Trajectory accuracy {trees['trajectory_accuracy']:.1%}, problems with a correct trajectory {trees['pass_at_all']:.1%}.", "",
        "## PRM and pairs", "",
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
        lines.append(f"| {stage} | `{where}` | {record.get('seconds', '')} | `{record.get('command', '')}` |")
    lines.append(f"| report | `{out}` | | (this stage) |")
    total = sum(record.get("seconds", 0.0) for record in state.values())
    lines += ["", f"Stage time so far: {total / 60:.1f} minutes (the report's own scoring comes on top)."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    figures = {"table": {k: {"before": b, "after": f} for k, (b, f) in table.items()},
               "tokens_saved_share": trees["tokens_saved_share"], "stage_seconds": {k: v.get("seconds") for k, v in state.items()},
               "report": str(out / "report.md"), "plot": str(plot)}
    (out / "report.json").write_text(json.dumps(figures, indent=2))
    return figures
