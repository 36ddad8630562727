"""GroundedPRM data (arXiv 2510.14942): tool-checked steps, a hybrid reward backed up through the
search tree, an agreement filter, and rationale-format SFT records for a generative PRM.

Over a tree of reasoning steps (built from any sampler's tree by `to_step_tree`):

1. the tool (`step_tool.StepTool`, sympy in sandboxed workers) gives every step a verdict
   v in {+1, -1, 0 (unverifiable)} -> `scores["tool"]`; the last step of a finished path gets
   the grounded verdict -1 if the tool or the final answer (F = +1 / -1 from `scores["outcome"]`)
   says it is wrong, else +1 -> `scores["verdict"]`;
2. a simulation from node s is a finished path through s; with v_0..v_{N-1} the verdicts of the
   steps strictly between s and the path's last step (unverifiable ones skipped; the last step is
   represented by F), its hybrid reward is, as in GroundedPRM's code (`MCTS.backpropagate`):
       V = sum_i (1/N) * v_i * (N - i) / N      (earlier steps weigh more)
       R = V + F / N,   or R = F when N = 0;
3. backup with decay: value(s) = sum over nodes m in s's subtree of gamma^(depth m - depth s) * R(m)
   (gamma = 0.9), i.e. each node's reward is added to it and to its ancestors, decayed by
   distance, as the code does once per expansion -> `scores["grounded"]` (the search value),
   `scores["grounded_visits"]`;
4. a finished path is kept only if no step's value is 0 and every verified step's value has the
   sign of its verdict; its labels are value > 0, and a negative path is cut after the run of
   negative steps that starts at its first error (GroundedPRM's `construct.py`);
5. each kept step becomes a rationale in GroundedPRM's generative format: <verify> what the tool
   computed </verify> <judge> the reasoning and the conclusion [Right] / [Wrong] </judge>
   <output> \\boxed{+} / \\boxed{-} </output>, as prompt/completion records `launch/sft.py` trains on.

Choices where this differs from the GroundedPRM code (which searches with an LLM-written
Wolfram Alpha query and an LLM judge): the tool is exact arithmetic; a node reached by several
finished paths takes the mean of their rewards as its own R (the code's MCTS runs one simulation
per expansion); unverifiable steps are left out of V; a node with too few finished paths below it
can be topped up with fresh simulations from the policy (`simulate`), which are tool-checked and
graded the same way but, as in MCTS, not added to the tree.

A data run chains them: `label_trees` (steps 1-3 over a sampler's trees), `agreeing_paths_of`
(step 4 over all trees), `rationale_records` (step 5), `data_metrics`, and on arith
`checker_agreement` (the kept labels against the exact checker's).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treetune.data.steps import split_steps, step_separator
from treetune.rewards.evaluation.processbench import checker_label, tree_problem
from treetune.rewards.scorers.grounded_gen import SYSTEM_PROMPT, render_plain  # the PRM's input format
from treetune.rewards.scorers.tool import StepTool
from treetune.rollouts.engines import GenerationRequest, SamplingSettings
from treetune.rollouts.stopping import request_seed
from treetune.rollouts.tree import ReasoningTree

GAMMA = 0.9


def separator(step_mode: str) -> str:
    """The text that joins steps back into a path: the one rule of `treetune.data.steps`."""
    return step_separator(step_mode)


# -- the hybrid reward -----------------------------------------------------------------------------

def hybrid_reward(verdicts: Sequence[int], outcome: int) -> float:
    """GroundedPRM's reward of one simulation: the position-weighted mean of the tool verdicts of
    its steps (earlier steps weigh more) plus the final-answer term F / N; F alone when N = 0."""
    if outcome not in (1, -1):
        raise ValueError(f"the outcome term F must be +1 or -1, not {outcome!r}")
    n = len(verdicts)
    if n == 0:
        return float(outcome)
    return sum(v * (n - i) / n for i, v in enumerate(verdicts)) / n + outcome / n


# -- step trees ------------------------------------------------------------------------------------

def to_step_tree(tree: ReasoningTree, step_mode: str = "line") -> ReasoningTree:
    """The same tree with one node per reasoning step: every leaf's path text split into steps and
    merged into a trie (paths that share their first steps share nodes). A finished leaf's
    `finish_reason` and `outcome` go to the node of its last step, which may also have children
    when a longer path continues it; `paths` counts the leaves merged into each node."""
    out = ReasoningTree(problem_id=tree.problem_id, prompt=tree.prompt, prompt_ids=list(tree.prompt_ids),
                        answer=tree.answer, sampler={"name": "steps", "step_mode": step_mode, "from": tree.sampler},
                        problem=dict(tree.problem))
    sep = separator(step_mode)
    index: dict[tuple[int, str], int] = {}
    for leaf in tree.leaves(finished_only=False):
        node_id = 0
        for step in split_steps(tree.path_text(leaf.id), step_mode):
            key = (node_id, step)
            if key not in index:
                index[key] = out.add(node_id, step + sep, []).id
            node_id = index[key]
            out.nodes[node_id].scores["paths"] = out.nodes[node_id].scores.get("paths", 0) + 1
        if node_id == 0 or not leaf.finished:
            continue
        node = out.nodes[node_id]
        node.finish_reason = node.finish_reason or leaf.finish_reason
        if "outcome" in leaf.scores:
            node.scores["outcome"] = max(float(leaf.scores["outcome"]), float(node.scores.get("outcome", 0.0)))
    return out


def steps_of(tree: ReasoningTree, node_id: int) -> list[str]:
    return [n.text.strip() for n in tree.path(node_id)]


def ends(tree: ReasoningTree) -> list[int]:
    """Ids of the nodes where a finished path ends."""
    return [n.id for n in tree.nodes[1:] if n.finished]


def _outcome_sign(tree: ReasoningTree, node_id: int) -> int:
    node = tree.nodes[node_id]
    if "outcome" not in node.scores:
        raise ValueError(f"tree {tree.problem_id}: finished node {node_id} has no 'outcome' score; "
                         "grade the trees first (treetune.rewards.outcome.score_outcomes)")
    return 1 if node.scores["outcome"] > 0 else -1


def annotate_tool(trees: Sequence[ReasoningTree], tool: StepTool, progress: bool = False) -> None:
    """`scores["tool"]` (+1 / -1 / 0) and `scores["tool_check"]` on every step node, and the
    grounded `scores["verdict"]` (the tool's, combined with F on the last step of a finished path).
    One tool call for all trees; each node is checked in the context of its own path."""
    jobs = [(tree, node.id) for tree in trees for node in tree.nodes[1:] if tree.is_leaf(node.id)]
    checks = tool.check([t.problem.get("question", t.prompt) for t, _ in jobs], [steps_of(t, i) for t, i in jobs], progress)
    for (tree, leaf_id), path_checks in zip(jobs, checks):
        for node, check in zip(tree.path(leaf_id), path_checks):
            node.scores["tool"] = check.sign
            node.scores["tool_check"] = check.to_dict()
    for tree in trees:
        for node in tree.nodes[1:]:
            verdict = node.scores["tool"]
            if node.finished:
                verdict = -1 if verdict == -1 or _outcome_sign(tree, node.id) == -1 else 1
            node.scores["verdict"] = verdict


# -- simulations and backup ------------------------------------------------------------------------

def simulate(trees: Sequence[ReasoningTree], engine, tool: StepTool, grader, k: int = 4, step_mode: str = "line",
             temperature: float = 1.0, max_tokens: int = 256, seed: int = 0) -> int:
    """Top every unfinished step node up to `k` simulations: fresh completions of its path from
    the policy, tool-checked and graded, whose hybrid rewards go to `scores["rollout_rewards"]`.
    Finished paths already below a node count towards `k`. Returns the number of completions."""
    requests, owners = [], []
    for tree in trees:
        below = _ends_below(tree)
        for node in tree.nodes[1:]:
            missing = k - len(below[node.id]) - len(node.scores.get("rollout_rewards", []))
            if node.finished or missing <= 0:
                continue
            prefix = "".join(n.text for n in tree.path(node.id))
            ids = tree.prompt_ids + engine.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            requests.append(GenerationRequest(ids, SamplingSettings(n=missing, temperature=temperature, max_tokens=max_tokens,
                                                                    seed=request_seed(seed, tree.problem_id, node.id)),
                                              group=tree.problem_id))
            owners.append((tree, node))
    if not requests:
        return 0
    results = engine.generate(requests)
    texts, golds, questions, paths, cut = [], [], [], [], []
    for (tree, node), result in zip(owners, results):
        prefix_steps = steps_of(tree, node.id)
        for completion in result.completions:
            text = "".join(n.text for n in tree.path(node.id)) + completion.text
            texts.append(text)
            golds.append(tree.answer)
            questions.append(tree.problem.get("question", tree.prompt))
            paths.append(prefix_steps + split_steps(completion.text, step_mode))
            cut.append(len(prefix_steps))
    verdicts = grader.grade_many(texts, golds)
    checks = tool.check(questions, paths)
    flat = iter(zip(verdicts, checks, cut))
    for (tree, node), result in zip(owners, results):
        rewards = node.scores.setdefault("rollout_rewards", [])
        for _ in result.completions:
            ok, path_checks, start = next(flat)
            between = [c.sign for c in path_checks[start:-1] if c.sign != 0]  # the last step is F's
            rewards.append(hybrid_reward(between, 1 if ok else -1))
    return sum(len(r.completions) for r in results)


def _ends_below(tree: ReasoningTree) -> dict[int, list[int]]:
    """For every node, the ends of the finished paths in its subtree (itself included)."""
    below: dict[int, list[int]] = {n.id: [] for n in tree.nodes}
    for end in ends(tree):
        node = tree.nodes[end]
        while node is not None:
            below[node.id].append(end)
            node = tree.nodes[node.parent] if node.parent is not None else None
    return below


def backup(tree: ReasoningTree, gamma: float = GAMMA) -> None:
    """Each node's own hybrid reward R (`grounded_reward`: the mean over the finished paths below
    it and its fresh simulations) and the decayed sum over its subtree (`grounded`, with
    `grounded_visits` counting the nodes that contributed). Needs `annotate_tool` first."""
    rewards: dict[int, list[float]] = {n.id: list(n.scores.get("rollout_rewards", [])) for n in tree.nodes[1:]}
    for end in ends(tree):
        path = tree.path(end)
        outcome = _outcome_sign(tree, end)
        verdicts = [n.scores["tool"] for n in path]
        for j, node in enumerate(path):
            between = [v for v in verdicts[j + 1:-1] if v != 0]
            rewards[node.id].append(hybrid_reward(between, outcome))
    for node in reversed(tree.nodes[1:]):  # children come after their parents
        own = rewards[node.id]
        node.scores["grounded_reward"] = sum(own) / len(own) if own else 0.0
        children = tree.children(node.id)
        node.scores["grounded"] = node.scores["grounded_reward"] + gamma * sum(c.scores["grounded"] for c in children)
        node.scores["grounded_visits"] = (1 if own else 0) + sum(c.scores["grounded_visits"] for c in children)


def annotate(trees: Sequence[ReasoningTree], tool: StepTool, gamma: float = GAMMA) -> None:
    """Tool verdicts and backed-up grounded values on step trees whose finished nodes are graded."""
    annotate_tool(trees, tool)
    for tree in trees:
        backup(tree, gamma)


# -- the agreement filter ----------------------------------------------------------------------------

@dataclass
class GroundedPath:
    problem_id: str
    question: str
    steps: list[str]
    values: list[float]
    verdicts: list[int]
    checks: list[dict[str, Any]]
    labels: list[bool]  # after truncation: may be shorter than `steps`
    outcome: bool


def truncate_labels(labels: Sequence[bool]) -> list[bool]:
    """All of a positive path; a negative one up to the end of the run of negative steps that
    starts at its first error."""
    labels = list(labels)
    if all(labels):
        return labels
    end = labels.index(False)
    while end < len(labels) and not labels[end]:
        end += 1
    return labels[:end]


def agreeing_paths(tree: ReasoningTree) -> tuple[list[GroundedPath], int]:
    """The finished paths whose search values all agree in sign with the grounded verdicts (and
    none is 0), labelled; and how many finished paths there were."""
    kept, total = [], 0
    for end in ends(tree):
        total += 1
        path = tree.path(end)
        values = [float(n.scores["grounded"]) for n in path]
        verdicts = [int(n.scores["verdict"]) for n in path]
        if any(v == 0 for v in values) or any(d != 0 and (v > 0) != (d > 0) for v, d in zip(values, verdicts)):
            continue
        kept.append(GroundedPath(tree.problem_id, tree.problem.get("question", tree.prompt), [n.text.strip() for n in path],
                                 values, verdicts, [n.scores.get("tool_check", {}) for n in path],
                                 truncate_labels([v > 0 for v in values]), _outcome_sign(tree, end) > 0))
    return kept, total


# -- the rationale format -------------------------------------------------------------------------

def _verification(check: dict[str, Any]) -> str:
    parts = []
    for eq in check.get("checks", []):
        sides, values, source = eq["equation"]["sides"], eq.get("values"), eq["equation"]["source"]
        if source == "answer":
            parts.append(f"The final answer is {sides[1]} and the previous step's result is {sides[0]}.")
        elif values is None:
            parts.append(f"I could not evaluate {' = '.join(sides)} ({eq.get('note') or 'refused'}).")
        else:
            parts.append(f"The expression I need to verify is {sides[0]}; it evaluates to {values[0]}, "
                         f"and the step states {' = '.join(sides[1:])}.")
        if eq.get("note", "").startswith("operand"):
            parts.append(f"But the {eq['note']}.")
    return " ".join(parts) or "This step makes no calculation to verify."


def _judgement(check: dict[str, Any], label: bool, final: bool, after_error: bool) -> str:
    """The reasoning behind a label, from what the tool found; where it found nothing, from the
    step's place in the path (the label itself comes from the search value)."""
    failed = [eq for eq in check.get("checks", []) if eq.get("ok") is False]
    passed = [eq for eq in check.get("checks", []) if eq.get("ok")]
    if failed:
        eq = failed[0]
        sides = eq["equation"]["sides"]
        if eq["note"].startswith("operand"):
            reason = f"The step uses a number that was never given or derived: the {eq['note']}"
        elif eq["equation"]["source"] == "answer":
            reason = f"The final answer {sides[1]} does not match the result {sides[0]} just computed"
        else:
            reason = f"The step states {' = '.join(sides)}, but {sides[0]} is {eq['values'][0]}"
    elif passed and all(eq["equation"]["source"] == "answer" for eq in passed):
        reason = ("The final answer is the result of the previous step and answers the question" if label
                  else "The final answer repeats the previous step's result, but that result rests on an earlier mistake"
                  if after_error else "The final answer repeats the previous step's result, but that is not what the problem asks for")
    elif passed and label:
        reason = "The calculation is right"
    elif passed:
        reason = ("The calculation itself is right, but it carries forward an earlier mistake" if after_error
                  else "The calculation itself is right, but it does not lead to the answer the problem asks for")
    elif final:
        reason = ("The final answer follows from correct steps" if label
                  else "The final answer rests on an earlier mistake" if after_error
                  else "The final answer is not what the problem asks for")
    else:
        reason = ("The step is consistent with the problem and the earlier steps" if label
                  else "The step builds on an earlier mistake" if after_error
                  else "The step leads away from a correct solution")
    return f"{reason}. The conclusion is [{'Right' if label else 'Wrong'}]"


def rationale(check: dict[str, Any], label: bool, final: bool = False, after_error: bool = False) -> str:
    """One step's target text: <verify>, <judge> ending in [Right] / [Wrong], <output> \\boxed{+/-}."""
    return (f"<verify>\n{_verification(check)}\n</verify>\n"
            f"<judge>\n{_judgement(check, label, final, after_error)}\n</judge>\n"
            f"<output>\nSo this step is: \\boxed{{{'+' if label else '-'}}}\n</output>")


def conversation(path: GroundedPath) -> list[dict[str, str]]:
    """The path as a multi-turn chat: the problem with step 1, then one user turn per step, each
    answered by its rationale."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    wrong_before = False
    for i, label in enumerate(path.labels):
        step = f"Step {i + 1}: {path.steps[i]}"
        messages.append({"role": "user", "content": f"Problem: {path.question}\n\n{step}" if i == 0 else step})
        final = i == len(path.steps) - 1
        messages.append({"role": "assistant", "content": rationale(path.checks[i], label, final, wrong_before)})
        wrong_before = wrong_before or not label
    return messages


def rationale_records(paths: Sequence[GroundedPath], tokenizer=None) -> list[dict[str, Any]]:
    """One SFT record per labelled step: `prompt` (the chat so far, through the tokenizer's chat
    template when one is given, else `render_plain`), `completion` (the step's rationale),
    `messages` (the chat through this step) and the label and value for inspection."""
    out = []
    for path in paths:
        messages = conversation(path)
        for i in range(len(path.labels)):
            upto = messages[: 2 * i + 2]  # system + (user, assistant) * i + this step's user turn
            if tokenizer is not None and getattr(tokenizer, "chat_template", None):
                prompt = tokenizer.apply_chat_template(upto, tokenize=False, add_generation_prompt=True)
            else:
                prompt = render_plain(upto)
            out.append({"prompt": prompt, "completion": messages[2 * i + 2]["content"],
                        "messages": messages[: 2 * i + 3], "label": "+" if path.labels[i] else "-",
                        "problem_id": path.problem_id, "step": i, "value": path.values[i], "verdict": path.verdicts[i]})
    return out


def write_records(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def parse_verdict(text: str) -> bool | None:
    """The verdict of a generated rationale: the last \\boxed{+} / \\boxed{-}, else [Right] / [Wrong]."""
    plus, minus = text.rfind("\\boxed{+}"), text.rfind("\\boxed{-}")
    if plus >= 0 or minus >= 0:
        return plus > minus
    right, wrong = text.rfind("[Right]"), text.rfind("[Wrong]")
    if right >= 0 or wrong >= 0:
        return right > wrong
    return None


# -- a data run ---------------------------------------------------------------------------------------

def label_trees(trees: Sequence[ReasoningTree], tool: StepTool, step_mode: str = "line", gamma: float = GAMMA,
                engine=None, grader=None, simulations: int = 0, simulation_max_tokens: int = 128,
                temperature: float = 1.0, seed: int = 0, progress: bool = False) -> tuple[list[ReasoningTree], int]:
    """Graded trees of any sampler -> step trees with tool verdicts and backed-up grounded values;
    with `simulations` > 0 each unfinished step node is first topped up with that many fresh
    completions from the policy in `engine`, graded by `grader`. Returns the step trees and the
    number of fresh completions."""
    step_trees = [to_step_tree(t, step_mode) for t in trees]
    annotate_tool(step_trees, tool, progress=progress)
    simulated = 0
    if simulations > 0:
        if engine is None or grader is None:
            raise ValueError("simulations need the policy's engine and a grader")
        simulated = simulate(step_trees, engine, tool, grader, k=simulations, step_mode=step_mode,
                             temperature=temperature, max_tokens=simulation_max_tokens, seed=seed)
    for tree in step_trees:
        backup(tree, gamma)
    return step_trees, simulated


def agreeing_paths_of(trees: Sequence[ReasoningTree]) -> tuple[list[GroundedPath], int]:
    """`agreeing_paths` over many trees: the kept paths of all, and how many finished paths there were."""
    kept, finished = [], 0
    for tree in trees:
        paths, total = agreeing_paths(tree)
        kept += paths
        finished += total
    return kept, finished


def write_step_trees(trees: Sequence[ReasoningTree], path: str | Path) -> Path:
    """Step trees as JSON lines, one tree a line (`ReasoningTree.from_json` reads them back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for tree in trees:
            f.write(tree.to_json() + "\n")
    return path


def data_metrics(trees: Sequence[ReasoningTree], kept: Sequence[GroundedPath], finished: int,
                 records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What a data run made: step nodes and the tool's verdicts on them, the share of finished
    paths the agreement filter kept, and the records by label."""
    verdicts = Counter(n.scores["tool"] for t in trees for n in t.nodes[1:])
    return {
        "problems": len(trees),
        "step_nodes": sum(len(t.nodes) - 1 for t in trees),
        "tool_verdicts": {"correct": verdicts[1], "incorrect": verdicts[-1], "unverifiable": verdicts[0]},
        "finished_paths": finished,
        "kept_paths": len(kept),
        "kept_share": len(kept) / finished if finished else 0.0,
        "kept_correct_outcome": sum(p.outcome for p in kept),
        "records": len(records),
        "records_positive": sum(r["label"] == "+" for r in records),
        "records_negative": sum(r["label"] == "-" for r in records),
    }


def checker_agreement(paths: Sequence[GroundedPath], trees_by_id: dict[str, ReasoningTree]) -> dict[str, Any]:
    """On arith: how often the kept labels equal the exact checker's, over the steps up to and
    including its first error (the checker judges nothing after it; those labels are counted apart)."""
    counts: Counter = Counter()
    for path in paths:
        first = checker_label(tree_problem(trees_by_id[path.problem_id]), path.steps)
        for i, label in enumerate(path.labels):
            if first == -1 or i <= first:
                counts["agree" if label == (first == -1 or i < first) else "disagree"] += 1
            else:
                counts["after_first_error"] += 1
    labelled = counts["agree"] + counts["disagree"]
    return {"labels_compared": labelled, "agreement": counts["agree"] / labelled if labelled else None,
            "labels_after_first_error": counts["after_first_error"]}


__all__ = ["GAMMA", "GroundedPath", "agreeing_paths", "agreeing_paths_of", "annotate", "annotate_tool", "backup",
           "checker_agreement", "conversation", "data_metrics", "hybrid_reward", "label_trees", "parse_verdict",
           "rationale", "rationale_records", "render_plain", "simulate", "to_step_tree", "truncate_labels",
           "write_records", "write_step_trees"]
