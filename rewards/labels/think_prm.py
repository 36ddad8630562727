"""ThinkPRM training data as the paper builds it (section 4.2): verification chains for
(problem, solution) pairs with gold process labels, kept only when every step verdict matches the
gold labels, the chain is complete and not too long, then balanced on final correctness, and
written as prompt/completion records that `launch/sft.py --dataset_source records` trains on.

Where the chains come from is pluggable: sampled from a verifier (`ThinkPRM.verify`, the paper's
teacher role, and later rounds of self-training), or, on arith, written from a template that the
exact checker fills (`arith_template_chain`), which gives the first verifier its format.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from treetune.data import Problem
from treetune.data.answers import extract_answer
from treetune.data.arith import EQUATION, apply_op, check_solution, problem_ops
from treetune.rewards.scorers.think_prm import (
    chain_complete,
    chain_step,
    parse_step_labels,
    render_prompt,
    training_completion,
)


@dataclass
class VerificationExample:
    """One solution with its gold first-error index (-1: all right) and a candidate chain."""

    problem_id: str
    question: str
    steps: list[str]
    first_error: int
    chain: str = ""

    @property
    def correct(self) -> bool:
        return self.first_error == -1

    def gold_labels(self) -> list[int]:
        """Gold verdicts up to the first error (the steps after it are not judged, as in PRM800K)."""
        n = len(self.steps) if self.first_error == -1 else self.first_error + 1
        return [1 if i != self.first_error else 0 for i in range(n)]


def chain_matches(chain: str, example: VerificationExample) -> bool:
    """The paper's process filter: a verdict for every judged step, each equal to the gold label."""
    gold = example.gold_labels()
    if not chain_complete(chain, len(example.steps)):
        return False
    return parse_step_labels(chain, len(example.steps))[:len(gold)] == gold


def balance(examples: Sequence[VerificationExample], seed: int = 0) -> list[VerificationExample]:
    """As many correct as incorrect solutions (the larger side is subsampled), order shuffled."""
    rng = random.Random(seed)
    right = [e for e in examples if e.correct]
    wrong = [e for e in examples if not e.correct]
    k = min(len(right), len(wrong))
    kept = rng.sample(right, k) + rng.sample(wrong, k)
    rng.shuffle(kept)
    return kept


@dataclass
class FilterReport:
    candidates: int = 0
    incomplete: int = 0
    label_mismatch: int = 0
    too_long: int = 0
    passed: int = 0
    kept_after_balance: int = 0


def filter_chains(examples: Sequence[VerificationExample], tokenizer=None, max_chain_tokens: int | None = None,
                  seed: int = 0, balanced: bool = True) -> tuple[list[VerificationExample], FilterReport]:
    """Keep chains that are complete, match the gold labels and fit `max_chain_tokens`; then balance."""
    report = FilterReport(candidates=len(examples))
    passed = []
    for e in examples:
        if not chain_complete(e.chain, len(e.steps)):
            report.incomplete += 1
        elif not chain_matches(e.chain, e):
            report.label_mismatch += 1
        elif max_chain_tokens is not None and tokenizer is not None and \
                len(tokenizer(e.chain, add_special_tokens=False)["input_ids"]) > max_chain_tokens:
            report.too_long += 1
        else:
            passed.append(e)
    report.passed = len(passed)
    kept = balance(passed, seed) if balanced else passed
    report.kept_after_balance = len(kept)
    return kept, report


def trim_chain(chain: str, num_steps: int) -> str:
    """The paper's cleaning: drop whatever follows the last verdict that counts."""
    import re

    ends = [m.end() for m in re.finditer(r"\\boxed\{\s*(?:correct|incorrect)\s*\}", chain)]
    if not ends:
        return chain.rstrip()
    labels = parse_step_labels(chain, num_steps)
    used = next((i + 1 for i, v in enumerate(labels) if v == 0), num_steps)
    return chain[:ends[min(used, len(ends)) - 1]]


def to_records(examples: Sequence[VerificationExample], tokenizer=None, chat: bool = False,
               style: str = "paper") -> list[dict]:
    """Prompt/completion records (plus what they came from) for `launch/sft.py`."""
    return [{"prompt": render_prompt(e.question, e.steps, tokenizer, chat, style),
             "completion": training_completion(trim_chain(e.chain, len(e.steps)), e.correct),
             "problem_id": e.problem_id, "steps": e.steps, "first_error": e.first_error}
            for e in examples]


def write_records(records: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for r in records:
            handle.write(json.dumps(r) + "\n")
    return path


# --- arith: gold labels from the exact checker, and a checker-filled chain template ---------------

def arith_example(problem: Problem, steps: Sequence[str]) -> VerificationExample | None:
    """The example for one arith solution, or None when the solution stops before its answer
    (its last step is right but nothing says so: an ambiguous label for a verifier told to
    judge only the steps it is given)."""

    first = check_solution(problem, "\n".join(steps))
    if first == len(steps):
        return None
    return VerificationExample(problem.id, problem.question, list(steps), first)


def arith_template_chain(problem: Problem, steps: Sequence[str]) -> str:
    """A verification chain the checker writes: each step recomputed from the story and compared
    with what the step says; it stops after the first incorrect step, as the synthesis prompt asks."""

    start, ops = problem_ops(problem)
    first = check_solution(problem, "\n".join(steps))
    value, parts = start, []
    for i, step in enumerate(steps):
        right = first == -1 or i < first
        if i < len(ops):
            op, operand = ops[i]
            expected = apply_op(value, op, operand)
            verb = "adds" if op == "+" else "takes"
            # short critiques: the arith verifier reads most words a character at a time
            if EQUATION.match(step) is None:
                critique = f"{verb} {operand}: {value}{op}{operand}={expected}, not this."
            else:
                critique = f"{verb} {operand}: {value}{op}{operand}={expected}, {'same' if right else 'not this'}."
            value = expected
        elif i == len(ops):
            critique = f"total {value}, answer {extract_answer(step)}, {'same' if right else 'not this'}."
        else:
            critique = "nothing may follow the answer."
        parts.append(chain_step(i + 1, critique, right))
        if not right:
            break
    return "".join(parts)


def widen_context(model_path: str, out_dir: str | Path, positions: int) -> Path:
    """A copy of a RoPE model (weights, tokenizer) whose config allows `positions` tokens: the arith
    policy knows the arithmetic and the tokenizer but was trained on 256 positions, too few for a
    verification prompt and chain. RoPE has no position table, so only the config changes; the
    fine-tuning on long records teaches the model the longer range."""
    import shutil

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_path, out)
    config = json.loads((out / "config.json").read_text())
    if "max_position_embeddings" not in config:
        raise ValueError(f"{model_path}/config.json: no max_position_embeddings field to widen")
    config["max_position_embeddings"] = max(positions, int(config["max_position_embeddings"]))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
