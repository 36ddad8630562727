"""Step-wise preference pairs: the record format, reading it, and the prompts the trainer sees.

A record is the public Step-DPO format (`xinlai/Math-Step-DPO-10K`):
`prompt` (the raw problem), `initial_reason_steps` (the correct prefix, possibly empty), `chosen`
and `rejected` (one step each), `answer` (the gold answer). treetune's own pair files are the same
records with a few extra fields (`problem_id`, `step_index`, `origin`, values), so one reader
serves both, from a local JSONL or a hub dataset name.

The DPO prompt is the problem rendered by a template, followed directly by the prefix. Besides
treetune's own styles (`bare`, `plain`, `chat`) the Step-DPO release's named templates are kept
exactly, since its checkpoints and data were made with them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from treetune.data.prompts import DEFAULT_INSTRUCTION, STYLES, PromptTemplate
from treetune.data.records import DataError, SkipReport, convert_source, require

# The Step-DPO release's prompt layouts; `{problem}` is the raw problem. How the prefix follows
# (directly, after a newline, after a space) is part of each layout.
STEP_DPO_TEMPLATES: dict[str, tuple[str, str]] = {
    "qwen2-boxed": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{problem}\n"
                    "Please reason step by step, and put your final answer within \\boxed{{}}.<|im_end|>\n"
                    "<|im_start|>assistant\n", ""),
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\n{problem}\n\n### Response:", "\n"),
    "deepseek-math": ("User: {problem}\nPlease reason step by step, and put your final answer within "
                      "\\boxed{{}}.\n\nAssistant:", " "),
}
PAIR_STYLES = STYLES + tuple(STEP_DPO_TEMPLATES)


@dataclass
class StepPair:
    prompt: str  # the raw problem
    initial_reason_steps: str  # the correct prefix the two steps continue
    chosen: str
    rejected: str
    answer: str = ""
    problem_id: str = ""
    step_index: int = -1  # 0-based index of the contested step
    origin: str = ""  # how the pair was found: first_error, tree_branch, full_solution, hub
    chosen_value: float | None = None
    rejected_value: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def dpo_prompt(pair: StepPair, style: str, tokenizer=None, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The text the two steps continue: the templated problem, then the correct prefix."""
    if style in STEP_DPO_TEMPLATES:
        head, joiner = STEP_DPO_TEMPLATES[style]
        prompt = head.format(problem=pair.prompt)
        return prompt + joiner + pair.initial_reason_steps if pair.initial_reason_steps else prompt
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {', '.join(PAIR_STYLES)}")
    return PromptTemplate(style=style, instruction=instruction).render(pair.prompt, tokenizer) + pair.initial_reason_steps


def pair_from_record(record: dict[str, Any], where: str, line: int) -> StepPair:
    """A `StepPair` from one public-format or treetune record; errors name file, line and field."""
    prompt = require(record, "prompt", where, line)
    prefix = record.get("initial_reason_steps", record.get("prefix", ""))
    if prefix is None:
        prefix = ""
    if not isinstance(prefix, str):
        raise DataError(where, line, f"expected str, got {type(prefix).__name__}", field="initial_reason_steps")
    chosen = require(record, "chosen", where, line)
    rejected = require(record, "rejected", where, line)
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise DataError(where, line, "empty", field=name)
    if chosen == rejected:
        raise DataError(where, line, "chosen and rejected are the same text", field="rejected")
    answer = record.get("answer", "")
    if isinstance(answer, list):  # some releases store a list of accepted answers
        answer = answer[0] if answer else ""
    known = {f for f in StepPair.__dataclass_fields__}
    return StepPair(prompt=prompt, initial_reason_steps=prefix, chosen=chosen, rejected=rejected,
                    answer=str(answer), problem_id=str(record.get("problem_id", record.get("id", ""))),
                    step_index=int(record.get("step_index", -1)), origin=str(record.get("origin", "") or ""),
                    chosen_value=record.get("chosen_value"), rejected_value=record.get("rejected_value"),
                    extra={**(record.get("extra") or {}),
                           **{k: v for k, v in record.items() if k not in known and k != "prefix"}})


def load_step_pairs(source: str, split: str = "train", skip_bad: bool = False,
                    limit: int | None = None) -> tuple[list[StepPair], SkipReport]:
    """Pairs from a local JSONL / JSON file or a hub dataset name (e.g. `xinlai/Math-Step-DPO-10K`).

    A bad row raises `DataError` naming file, line and field; with `skip_bad` it goes into the
    returned report instead (never silently)."""
    return convert_source(source, split, pair_from_record, skip_bad=skip_bad, limit=limit)


def write_step_pairs(pairs: list[StepPair], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(pair.to_json() + "\n")
