"""Process labels from sampled trees: Monte Carlo estimation, consensus filtering, SCAN.

For a solution split into steps, the MC value of step i is the share of completions from the
prefix "steps 0..i" that reach the gold answer (Math-Shepherd). Completions come from the tree
itself first: every finished trajectory of the same tree whose text starts with that prefix is a
sample of the policy continuing it. Where fewer than `k` exist, the engine tops the count up with
fresh completions of the prefix.

- hard label: value > 0 (any completion correct), the Qwen2.5-Math-PRM choice;
- soft label: the value itself;
- consensus: keep a solution only where the MC first error (first step with value 0) and a
  second judge's first wrong step agree (-1 for none);
- SCAN: a problem's self-confidence is the share of its trajectories that are correct; problems
  below `min_confidence` are dropped, and the two steps before the MC first error get the soft
  label min(1, value / confidence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from treetune.data.steps import split_steps, step_ends
from treetune.rewards.grading import Grader
from treetune.rollouts.engines import GenerationRequest, SamplingSettings
from treetune.rollouts.stopping import request_seed
from treetune.rollouts.tree import ReasoningTree


@dataclass
class LabelledSolution:
    problem_id: str
    question: str
    prompt: str
    steps: list[str]
    values: list[float]  # MC value per step
    correct: bool  # the solution's own outcome
    confidence: float  # the problem's share of correct trajectories
    extra: dict = field(default_factory=dict)

    @property
    def mc_first_error(self) -> int:
        return next((i for i, v in enumerate(self.values) if v == 0.0), -1)

    def _end(self, truncate: bool) -> int:
        first = self.mc_first_error
        return len(self.values) if first == -1 or not truncate else first + 1

    def hard_labels(self, truncate: bool = True) -> list[bool]:
        """value > 0 per step; with `truncate`, steps after the first zero-value one are dropped
        (Qwen's convention). Keeping them gives the PRM wrong steps late in solutions too, so it
        cannot learn "late means right" from position alone."""
        return [v > 0.0 for v in self.values[: self._end(truncate)]]

    def soft_labels(self, truncate: bool = True) -> list[float]:
        return list(self.values[: self._end(truncate)])

    def scan_labels(self) -> list[float]:
        """SCAN: correct solutions all 1; else 1 before the first error, 0 at it, and the two steps
        before it min(1, value / confidence)."""
        if self.correct and self.mc_first_error == -1:
            return [1.0] * len(self.values)
        first = self.mc_first_error
        if first == -1:
            return []
        labels = [1.0] * first + [0.0]
        for i in (first - 1, first - 2):
            if i >= 0:
                labels[i] = min(1.0, self.values[i] / self.confidence) if self.confidence > 0 else 0.0
        return labels


def mc_estimate(trees: Sequence[ReasoningTree], engine, grader: Grader, k: int = 8, step_mode: str = "line",
                temperature: float = 1.0, max_tokens: int = 256, seed: int = 0, only_wrong: bool = False
                ) -> list[LabelledSolution]:
    """MC values for every step of every finished trajectory (or only the wrong ones) of `trees`.

    Leaves need `scores["outcome"]`. The last step of a solution gets its own outcome (the
    solution is its own only completion), so no sampling is spent on it.
    """
    solutions, jobs = [], []  # jobs: (solution index, step index, prefix text)
    for tree in trees:
        leaves = tree.leaves()
        texts = {leaf.id: tree.path_text(leaf.id) for leaf in leaves}
        outcomes = {leaf.id: float(leaf.scores["outcome"]) for leaf in leaves}
        confidence = sum(outcomes.values()) / len(outcomes) if outcomes else 0.0
        for leaf in leaves:
            if only_wrong and outcomes[leaf.id] > 0:
                continue
            steps = split_steps(texts[leaf.id], step_mode)
            if not steps:
                continue
            index = len(solutions)
            solutions.append(LabelledSolution(tree.problem_id, tree.problem.get("question", ""), tree.prompt, steps,
                                              [0.0] * len(steps), bool(outcomes[leaf.id]), confidence))
            ends = step_ends(texts[leaf.id], steps)
            for i in range(len(steps) - 1):
                # the solution through step i as it was written (not re-joined by a separator), so that
                # other trajectories that continue it match and fresh completions continue the very text
                prefix = texts[leaf.id][: ends[i]]
                # other trajectories continuing this prefix (not the solution itself: it was
                # selected, e.g. for being wrong, so its own ending is not a fair draw)
                reused = [outcomes[o] for o, text in texts.items() if o != leaf.id and text.startswith(prefix)][:k]
                jobs.append((index, i, prefix, tree, reused))
            solutions[index].values[-1] = outcomes[leaf.id]
    # Top up thin prefixes with fresh completions, all in one engine batch.
    requests, owners = [], []
    for index, i, prefix, tree, reused in jobs:
        missing = k - len(reused)
        if missing > 0:
            prompt_ids = tree.prompt_ids + engine.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            requests.append(GenerationRequest(prompt_ids, SamplingSettings(
                n=missing, temperature=temperature, max_tokens=max_tokens,
                seed=request_seed(seed, tree.problem_id, index * 1000 + i)), group=tree.problem_id))
            owners.append((index, i, prefix, tree))
    fresh: dict[tuple[int, int], list[float]] = {}
    if requests:
        results = engine.generate(requests)
        texts = [prefix + c.text for (_, _, prefix, _), r in zip(owners, results) for c in r.completions]
        golds = [tree.answer for (_, _, _, tree), r in zip(owners, results) for _ in r.completions]
        verdicts = iter(grader.grade_many(texts, golds))
        for (index, i, _, _), r in zip(owners, results):
            fresh[(index, i)] = [1.0 if next(verdicts) else 0.0 for _ in r.completions]
    for index, i, _, _, reused in jobs:
        draws = reused + fresh.get((index, i), [])
        solutions[index].values[i] = sum(draws) / len(draws) if draws else 0.0
    return solutions


def consensus(solutions: Sequence[LabelledSolution], judge_first_errors: Sequence[int]) -> list[LabelledSolution]:
    """The solutions whose MC first error equals the judge's first wrong step."""
    return [s for s, j in zip(solutions, judge_first_errors) if s.mc_first_error == j]


def to_stepwise(solutions: Sequence[LabelledSolution], kind: str = "hard", min_confidence: float = 0.0,
                truncate: bool = True) -> list[dict]:
    """TRL-style records with hard, soft or SCAN labels (SCAN drops problems below `min_confidence`;
    `truncate` drops hard / soft labels after the first zero-value step)."""
    out = []
    for s in solutions:
        if kind == "scan" and s.confidence < min_confidence:
            continue
        labels = s.scan_labels() if kind == "scan" else {"hard": s.hard_labels, "soft": s.soft_labels}[kind](truncate)
        if labels:
            out.append({"prompt": s.prompt, "completions": s.steps[: len(labels)], "labels": labels})
    return out
