"""Building Step-DPO pairs from a policy's own samples (Step-DPO's pipeline, §3.2), and from trees.

1. Sample solutions (resumable tree shards) and grade them; keep the wrong ones.
2. Locate the first wrong step with any step scorer: the first step scoring below a threshold.
3. From the correct prefix before it, sample continuations; each continuation reaching the gold
   answer gives its first step as a chosen step (deduplicated), the wrong step is rejected.
4. Write the pairs (the public Step-DPO record plus provenance) and a summary of how many
   problems gave pairs and why the others did not.
Pairs are also read off any scored tree (TreePO, MCTS): at a branching node, siblings whose values
differ by at least a margin give a pair (`tree_branch_pairs`).

Progress is kept per problem (`status.jsonl`), so a killed run resumes without redoing or
duplicating the problems it finished. The job (`treetune.launch.step_dpo_data`) picks the scorer
(any step scorer: `treetune.rewards.scorers.load_scorer`) and passes the parts these functions read.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from treetune.data.step_pairs import StepPair
from treetune.data.steps import step_separator
from treetune.rewards.outcome import score_outcomes
from treetune.rollouts.engines.base import GenerationRequest, SamplingSettings
from treetune.rollouts.run import RolloutArgs, SamplingArgs, run_rollout
from treetune.rollouts.scoring import StepScorer
from treetune.rollouts.tree import ReasoningTree
from treetune.rollouts.tree_io import read_trees

log = logging.getLogger(__name__)


@dataclass
class FirstErrorSettings:
    """Step-DPO's own pipeline (§3.2): samples, where the first error is, how it is rectified."""

    samples: int = field(default=8, metadata={
        "help": "Solutions sampled per problem (Step-DPO: 2, over many more problems)."})
    continuations: int = field(default=8, metadata={
        "help": "Rectification samples from each correct prefix (Step-DPO: 20)."})
    error_threshold: float = field(default=0.5, metadata={"help": "A step scoring below this is wrong."})
    wrong_per_problem: int = field(default=2, metadata={"help": "Wrong solutions used per problem."})
    max_pairs_per_error: int = field(default=4, metadata={
        "help": "Distinct chosen steps kept against one rejected step."})
    verify_chosen: bool = field(default=False, metadata={
        "help": "Also require the scorer to accept the chosen step (the paper's optional filter)."})


def raw_steps(text: str, delimiter: str) -> list[str]:
    """The steps of `text` with their delimiters kept, so that joining them gives the text back.
    White-space-only pieces are folded into the step before them."""
    pieces = text.split(delimiter)
    steps: list[str] = []
    for i, piece in enumerate(pieces):
        chunk = piece + (delimiter if i < len(pieces) - 1 else "")
        if steps and not piece.strip():
            steps[-1] += chunk
        elif chunk:
            steps.append(chunk)
    return steps


def first_step(text: str, delimiter: str) -> str:
    steps = raw_steps(text, delimiter)
    return steps[0] if steps else ""


def _wrong(leaf) -> bool:
    return "outcome" in leaf.scores and not leaf.scores["outcome"]


def first_wrong_step(scores: Sequence[float], threshold: float) -> int:
    """Index of the first step scoring below `threshold`, or -1."""
    return next((i for i, s in enumerate(scores) if s < threshold), -1)


def subtree_value(tree: ReasoningTree, node_id: int, key: str = "outcome") -> float | None:
    """A node's value: its own `scores[key]` when it is a number, else the share of finished
    leaves below it whose outcome is correct (an MC estimate from the tree itself)."""
    own = tree.nodes[node_id].scores.get(key)
    if isinstance(own, (int, float)) and not isinstance(own, bool):
        return float(own)
    leaves = tree.leaves_under(node_id)
    graded = [bool(l.scores["outcome"]) for l in leaves if "outcome" in l.scores]
    return sum(graded) / len(graded) if graded else None


def tree_branch_pairs(tree: ReasoningTree, value_key: str = "outcome", margin: float = 0.5,
                      max_pairs_per_node: int = 1) -> list[StepPair]:
    """Pairs at branching nodes: the best-valued child against the worst when their values differ
    by at least `margin` (MCTS: `q`; TreePO / flat: the subtree's outcome share)."""
    pairs = []
    question = tree.problem.get("question", tree.prompt)
    for node in tree.nodes:
        children = tree.children(node.id)
        if len(children) < 2:
            continue
        # a child that added no text (a path that ended right at the branch) is no step to prefer
        valued = [(subtree_value(tree, c.id, value_key), c) for c in children if c.text.strip()]
        valued = sorted(((v, c) for v, c in valued if v is not None), key=lambda vc: -vc[0])
        prefix = tree.path_text(node.id) if node.id != tree.root.id else ""
        made = 0
        for hi, good in valued:
            for lo, bad in reversed(valued):
                if made >= max_pairs_per_node or hi - lo < margin or good.text == bad.text:
                    continue
                pairs.append(StepPair(prompt=question, initial_reason_steps=prefix, chosen=good.text, rejected=bad.text,
                                      answer=tree.answer, problem_id=tree.problem_id, step_index=node.depth,
                                      origin="tree_branch", chosen_value=hi, rejected_value=lo))
                made += 1
    return pairs


def locate_errors(trees: Sequence[ReasoningTree], scorer: StepScorer, settings: FirstErrorSettings,
                  step_mode: str = "line") -> list[dict]:
    """The wrong solutions of each tree (up to `wrong_per_problem`) with their first wrong step; a
    solution in which the scorer finds no wrong step is left out (build_pairs records why)."""
    delimiter = step_separator(step_mode)
    jobs = [{"tree": tree, "steps": raw_steps(tree.path_text(leaf.id), delimiter)}
            for tree in trees for leaf in [l for l in tree.leaves() if _wrong(l)][: settings.wrong_per_problem]]
    scored = scorer.score([j["tree"].problem.get("question", j["tree"].prompt) for j in jobs],
                          [[s.strip() for s in j["steps"]] for j in jobs]) if jobs else []
    located = []
    for job, scores in zip(jobs, scored):
        k = first_wrong_step(scores, settings.error_threshold)
        if k != -1:
            located.append({**job, "k": k})
    return located


def rectify(located: list[dict], engine, grader, scorer: StepScorer, settings: FirstErrorSettings,
            sampling: SamplingArgs, tokenizer, step_mode: str = "line") -> list[StepPair]:
    """Sample continuations from each correct prefix; correct ones give chosen steps."""
    delimiter = step_separator(step_mode)
    requests = []
    for i, job in enumerate(located):
        prefix = "".join(job["steps"][: job["k"]])
        job["prefix"] = prefix
        ids = list(job["tree"].prompt_ids) + (tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [])
        requests.append(GenerationRequest(ids, SamplingSettings(n=settings.continuations, temperature=sampling.temperature,
                                                                top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                                                                seed=sampling.seed + 7919 * (i + 1), logprobs=False),
                                          group=job["tree"].problem_id))
    results = engine.generate(requests, progress=True)
    outputs, golds, owners = [], [], []
    for i, (job, result) in enumerate(zip(located, results)):
        for completion in result.completions:
            outputs.append(job["prefix"] + completion.text)
            golds.append(job["tree"].answer)
            owners.append((i, completion.text))
    verdicts = grader.grade_many(outputs, golds)
    candidates: dict[int, dict[str, str]] = {}  # first step -> the first full continuation that began with it
    for (i, text), correct in zip(owners, verdicts):
        step = first_step(text, delimiter)
        if correct and step.strip():
            candidates.setdefault(i, {}).setdefault(step, text)
    pairs = []
    for i, job in enumerate(located):
        rejected = job["steps"][job["k"]]
        full = candidates.get(i, {})
        chosen = [s for s in full if s.strip() != rejected.strip()]
        if settings.verify_chosen and chosen:
            question = job["tree"].problem.get("question", job["tree"].prompt)
            head = [s.strip() for s in job["steps"][: job["k"]]]
            scores = scorer.score([question] * len(chosen), [head + [c.strip()] for c in chosen])
            chosen = [c for c, s in zip(chosen, scores) if s[-1] >= settings.error_threshold]
        job["pairs"] = len(chosen[: settings.max_pairs_per_error])
        question = job["tree"].problem.get("question", job["tree"].prompt)
        for c in chosen[: settings.max_pairs_per_error]:
            pairs.append(StepPair(prompt=question, initial_reason_steps=job["prefix"], chosen=c, rejected=rejected,
                                  answer=job["tree"].answer, problem_id=job["tree"].problem_id, step_index=job["k"],
                                  origin="first_error",
                                  # the whole continuations, as the public data keeps them (for whole-solution DPO)
                                  extra={"full_chosen": full[c], "full_rejected": "".join(job["steps"][job["k"]:])}))
    return pairs


class PairProgress:
    """pairs.jsonl plus status.jsonl (one line a finished problem); pairs of problems without a
    status line are from a killed run and are dropped on reopening, so nothing is duplicated."""

    def __init__(self, out: Path):
        self.pairs_path, self.status_path = out / "pairs.jsonl", out / "status.jsonl"
        self.done: dict[str, dict] = {}
        if self.status_path.exists():
            for line in self.status_path.read_text().splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line: that problem is redone
                    self.done[row["problem_id"]] = row
        if self.pairs_path.exists():
            kept = [line for line in self.pairs_path.read_text().splitlines()
                    if line.strip() and _problem_of(line) in self.done]
            self.pairs_path.write_text("".join(f"{line}\n" for line in kept))
        self.status_path.write_text("".join(json.dumps(r) + "\n" for r in self.done.values()))

    def record(self, problem_ids: Sequence[str], pairs: Sequence[StepPair], status: dict[str, str]) -> None:
        with self.pairs_path.open("a", encoding="utf-8") as handle:
            for pair in pairs:
                handle.write(pair.to_json() + "\n")
        counts = Counter(p.problem_id for p in pairs)
        with self.status_path.open("a", encoding="utf-8") as handle:
            for pid in problem_ids:
                row = {"problem_id": pid, "pairs": counts.get(pid, 0), "status": status.get(pid, "pairs")}
                self.done[pid] = row
                handle.write(json.dumps(row) + "\n")


def _problem_of(line: str) -> str | None:
    try:
        return json.loads(line).get("problem_id")
    except json.JSONDecodeError:
        return None


def build_pairs(out_dir: str | Path, engine, grader, tokenizer, problems, template, scorer: StepScorer,
                settings: FirstErrorSettings, sampling: SamplingArgs, step_mode: str = "line",
                batch_problems: int = 64) -> dict:
    """The whole pipeline over `problems`, resumable in `out_dir` (samples/trees, pairs.jsonl,
    status.jsonl); returns the summary."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rollout = RolloutArgs(output_dir=str(out / "samples"), sampler="flat", trajectories=settings.samples,
                          temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                          seed=sampling.seed, batch_problems=batch_problems)
    run_rollout(rollout, engine, tokenizer, problems, template, lambda trees: score_outcomes(trees, grader))
    trees = {t.problem_id: t for t in read_trees(out / "samples" / "trees")}
    state = PairProgress(out)
    todo = [p.id for p in problems if p.id not in state.done]
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc="step pairs", unit="problem")
    for start in range(0, len(todo), batch_problems):
        ids = todo[start:start + batch_problems]
        batch = [trees[i] for i in ids]
        located = locate_errors(batch, scorer, settings, step_mode)
        pairs = rectify(located, engine, grader, scorer, settings, sampling, tokenizer, step_mode) if located else []
        status = {}
        for tree in batch:
            mine = [j for j in located if j["tree"].problem_id == tree.problem_id]
            if not [l for l in tree.leaves() if _wrong(l)]:
                status[tree.problem_id] = "no wrong sample"
            elif not mine:
                status[tree.problem_id] = "scorer found no wrong step"
            elif not any(j.get("pairs") for j in mine):
                status[tree.problem_id] = "no correct continuation"
        state.record(ids, pairs, status)
        bar.update(len(ids))
    bar.close()
    statuses = Counter(r["status"] for pid, r in state.done.items() if pid in trees)
    total_pairs = sum(r["pairs"] for pid, r in state.done.items() if pid in trees)
    return {"problems": len(problems), "problems_with_pairs": statuses.get("pairs", 0), "pairs": total_pairs,
            "why_no_pairs": {k: v for k, v in statuses.items() if k != "pairs"}, "pairs_file": str(state.pairs_path)}


def pairs_from_trees(trees_path: str | Path, out_dir: str | Path, grader, value_key: str = "outcome",
                     margin: float = 0.5) -> dict:
    """Branching-node pairs of every tree under `trees_path` into `out_dir/pairs.jsonl`, graded
    first where needed; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trees = list(read_trees(trees_path))
    if not trees:
        raise ValueError(f"{trees_path}: no trees found")
    ungraded = [t for t in trees if any("outcome" not in l.scores for l in t.leaves())]
    if ungraded:
        score_outcomes(ungraded, grader)
    pairs, why = [], Counter()
    for tree in trees:
        mine = tree_branch_pairs(tree, value_key, margin)
        if not mine:
            why["no branching node with a value gap" if len(tree.leaves()) > 1 else "a single path"] += 1
        pairs += mine
    path = out / "pairs.jsonl"
    path.write_text("".join(p.to_json() + "\n" for p in pairs))
    return {"problems": len(trees), "problems_with_pairs": len({p.problem_id for p in pairs}), "pairs": len(pairs),
            "why_no_pairs": dict(why), "pairs_file": str(path)}
