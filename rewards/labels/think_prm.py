"""ThinkPRM training data as the paper builds it (section 4.2): verification chains for
(problem, solution) pairs with gold process labels, kept only when every step verdict matches the
gold labels, the chain is complete and not too long, then balanced on final correctness, and
written as prompt/completion records that `launch/sft.py --source records` trains on.

Where the chains come from is pluggable: sampled from a verifier (`ThinkPRM.verify`, the paper's
teacher role, and later rounds of self-training: `verifier_chains`), or, on arith, written from a
template that the exact checker fills (`arith_template_chain`, `template_chains`), which gives the
first verifier its format.

The steps of a data run: `sample_examples` (a policy's distinct solutions with the checker's gold
labels), a chain source, `build_records` (filter, balance, cap, render), `data_metrics`, and
`verifier_init` (the policy copy the verifier is fine-tuned from).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from treetune.data import Problem, PromptTemplate
from treetune.data.answers import extract_answer
from treetune.data.arith import EQUATION, apply_op, check_solution, problem_ops
from treetune.data.steps import split_steps
from treetune.rewards.scorers.think_prm import (
    SETTINGS_FILE,
    chain_complete,
    chain_step,
    parse_step_labels,
    render_prompt,
    training_completion,
)
from treetune.rollouts.flat import FlatSampler, FlatSettings
from treetune.rollouts.run import new_tree
from treetune.rollouts.tree import ReasoningTree

CHAIN_SOURCES = ("template", "verifier")


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


# --- a data run: solutions -> examples -> candidate chains -> records ---------------------------------

def examples_from_trees(trees: Sequence[ReasoningTree], problems: Sequence[Problem],
                        step_mode: str = "line") -> list[VerificationExample]:
    """One example per distinct finished solution of each tree (same steps once per problem), its
    gold first error from the arith checker; solutions that stop before their answer are left out."""
    by_id = {p.id: p for p in problems}
    examples = []
    for tree in trees:
        seen = set()
        for _, text in tree.iter_trajectories():
            steps = split_steps(text, step_mode)
            if not steps or tuple(steps) in seen:
                continue
            seen.add(tuple(steps))
            example = arith_example(by_id[tree.problem_id], steps)
            if example is not None:
                examples.append(example)
    return examples


def sample_examples(engine, problems: Sequence[Problem], samples: int = 4, max_tokens: int = 128,
                    temperature: float = 1.0, seed: int = 0, top_p: float = 1.0,
                    template: PromptTemplate | None = None) -> list[VerificationExample]:
    """`samples` solutions per arith problem from the policy in `engine`, prompted by `template`
    (default bare, the tiny policy's; an instruct model wants its chat template), as examples."""
    template = template or PromptTemplate(style="bare")
    trees = [new_tree(p, template, engine.tokenizer) for p in problems]
    settings = FlatSettings(n=samples, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return examples_from_trees(list(FlatSampler(settings).grow(engine, trees)), problems)


def template_chains(examples: Sequence[VerificationExample], problems: Sequence[Problem]) -> list[VerificationExample]:
    """Each example with the chain the arith checker writes for it (`arith_template_chain`)."""
    by_id = {p.id: p for p in problems}
    return [VerificationExample(e.problem_id, e.question, list(e.steps), e.first_error,
                                arith_template_chain(by_id[e.problem_id], e.steps)) for e in examples]


def verifier_chains(examples: Sequence[VerificationExample], verifier, progress: bool = False) -> list[VerificationExample]:
    """Candidates from a verifier's own chains (`verifier.verify`, e.g. a ThinkPRM): one per distinct
    chain of each example, so the filter can keep the right ones of its K samples."""
    verified = verifier.verify([e.question for e in examples], [e.steps for e in examples], progress=progress)
    return [VerificationExample(e.problem_id, e.question, list(e.steps), e.first_error, chain)
            for e, v in zip(examples, verified) for chain in dict.fromkeys(v.chains)]


def cap_records(examples: Sequence[VerificationExample], count: int | None) -> list[VerificationExample]:
    """At most `count` examples, half (rounded down) right solutions and the rest wrong ones, in order."""
    if count is None or len(examples) <= count:
        return list(examples)
    right, wrong = [e for e in examples if e.correct], [e for e in examples if not e.correct]
    return right[:count // 2] + wrong[:count - count // 2]


def build_records(candidates: Sequence[VerificationExample], tokenizer=None, max_chain_tokens: int | None = None,
                  seed: int = 0, balanced: bool = True, num_records: int | None = None, style: str = "paper",
                  chat: bool = False) -> tuple[list[dict], FilterReport]:
    """The SFT records of the candidates that pass the filter (`filter_chains`), capped at
    `num_records` (`cap_records`), rendered in `style`; and the filter's report."""
    kept, report = filter_chains(candidates, tokenizer, max_chain_tokens, seed=seed, balanced=balanced)
    return to_records(cap_records(kept, num_records), tokenizer, chat=chat, style=style), report


def data_metrics(examples: Sequence[VerificationExample], report: FilterReport, records: Sequence[dict],
                 tokenizer) -> dict:
    """What a data run made: solutions (and how many right), the filter's counts, records and their length."""
    lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in records]
    return {"solutions": len(examples), "correct_solutions": sum(e.correct for e in examples),
            "filter": asdict(report), "records": len(records),
            "record_tokens_max": max(lengths, default=0), "record_tokens_mean": sum(lengths) / max(1, len(lengths))}


def verifier_init(policy: str, out_dir: str | Path, positions: int, prompt_style: str = "paper",
                  chat: bool = False) -> Path:
    """The verifier's starting point: the policy with a `positions`-token context (`widen_context`),
    carrying the prompt format in its `think_prm.json`, which ThinkPRM reads back (`saved_format`)."""
    init = widen_context(policy, out_dir, positions)
    (init / SETTINGS_FILE).write_text(json.dumps({"prompt_style": prompt_style, "chat": chat}))
    return init
