"""BVPO preference pairs: the record, reading it, and the two prompt modes (trace on / trace off).

A record is `prompt` (the raw question, or user message), `chosen`, `rejected` (whole responses)
and `mode`: `trace` when the responses were generated with the reasoning trace, `empty` when the
trace was disabled by an empty think block. treetune's own pair files add provenance fields
(`problem_id`, scores, `answer`); one reader serves them and hub datasets alike.

Disabling the trace (BVPO paper §3.3, as quoted by reviewers: "appending '<think>…</think>' to each
input prompt"; the exact string is not recoverable from the sources and is **unverified**):
- a chat template that understands `enable_thinking` renders its own no-thinking prompt
  (Qwen3 and similar); that rendering is used as is;
- otherwise `EMPTY_THINK` = "<think>\\n\\n</think>\\n\\n" (the Qwen3 / R1 NoThinking convention) is
  appended to the prompt; when the prompt already opens a think block (R1-distill templates end in
  "<think>\\n"), only the closing part is appended, so the block is never opened twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from treetune.data.prompts import PromptTemplate
from treetune.data.records import DataError, SkipReport, convert_source, require

MODES = ("trace", "empty")
EMPTY_THINK = "<think>\n\n</think>\n\n"
OPEN_THINK = "<think>\n"


@dataclass
class BVPOPair:
    prompt: str  # the raw question (rendered per mode by `mode_prompt`)
    chosen: str
    rejected: str
    mode: str  # trace | empty
    problem_id: str = ""
    answer: str = ""
    chosen_score: float | None = None
    rejected_score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def _chat_messages(question: str, template: PromptTemplate) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": template.instruction}] if template.instruction else []
    for q, a in template.few_shot:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": question}]


def supports_enable_thinking(tokenizer) -> bool:
    """True when the tokenizer's chat template renders differently with `enable_thinking=False`."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return False
    messages = [{"role": "user", "content": "x"}]
    try:
        on = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
        off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    except Exception:  # noqa: BLE001 - a template that rejects the flag does not support it
        return False
    return on != off


def with_empty_think(prompt: str, block: str = EMPTY_THINK) -> str:
    """`prompt` followed by an empty think block, closing an already opened block instead of opening another."""
    if block == EMPTY_THINK:
        for opened in (OPEN_THINK, OPEN_THINK.rstrip("\n")):
            if prompt.endswith(opened):
                return prompt + block[len(opened):]
    return prompt + block


def mode_prompt(question: str, mode: str, template: PromptTemplate, tokenizer=None, block: str | None = None) -> str:
    """The prompt text for `question` in `mode` (see the module docstring for how `empty` is made)."""
    if mode not in MODES:
        raise ValueError(f"unknown BVPO mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "trace":
        return template.render(question, tokenizer)
    if template.style == "chat" and block is None and supports_enable_thinking(tokenizer):
        return tokenizer.apply_chat_template(_chat_messages(question, template), tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    return with_empty_think(template.render(question, tokenizer), block or EMPTY_THINK)


@dataclass
class ModeTemplate(PromptTemplate):
    """A `PromptTemplate` that renders in one BVPO mode, so `greedy_eval` and samplers take it unchanged."""

    mode: str = "trace"
    block: str | None = None

    def render(self, question: str, tokenizer=None) -> str:
        base = PromptTemplate(style=self.style, instruction=self.instruction, few_shot=self.few_shot)
        return mode_prompt(question, self.mode, base, tokenizer, self.block)


def _text(value: Any, where: str, line: int, name: str) -> str:
    """A response given as text, or as a conversation whose last assistant turn is the response."""
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        value = value[-1]["content"]
    if not isinstance(value, str):
        raise DataError(where, line, f"expected str or a list of messages, got {type(value).__name__}", field=name)
    if not value.strip():
        raise DataError(where, line, "empty", field=name)
    return value


def pair_from_record(record: dict[str, Any], where: str, line: int, default_mode: str | None = None) -> BVPOPair:
    """A `BVPOPair` from one record; errors name file, line and field."""
    prompt = record.get("prompt")
    if isinstance(prompt, list):  # a conversation: the last user turn is the question
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users else None
    if prompt is None:
        raise DataError(where, line, "missing", field="prompt")
    prompt = _text(prompt, where, line, "prompt")
    chosen = _text(require(record, "chosen", where, line, (str, list)), where, line, "chosen")
    rejected = _text(require(record, "rejected", where, line, (str, list)), where, line, "rejected")
    if chosen == rejected:
        raise DataError(where, line, "chosen and rejected are the same text", field="rejected")
    mode = record.get("mode", default_mode)
    if mode is None:
        raise DataError(where, line, "missing (trace or empty; or give the file as trace_pairs / empty_pairs)", field="mode")
    if mode not in MODES:
        raise DataError(where, line, f"expected one of {', '.join(MODES)}, got {mode!r}", field="mode")
    known = set(BVPOPair.__dataclass_fields__)
    return BVPOPair(prompt=prompt, chosen=chosen, rejected=rejected, mode=mode,
                    problem_id=str(record.get("problem_id", record.get("id", "")) or ""),
                    answer=str(record.get("answer", "") or ""), chosen_score=record.get("chosen_score"),
                    rejected_score=record.get("rejected_score"),
                    extra={**(record.get("extra") or {}), **{k: v for k, v in record.items() if k not in known}})


def load_bvpo_pairs(source: str, split: str = "train", mode: str | None = None, skip_bad: bool = False,
                    limit: int | None = None) -> tuple[list[BVPOPair], SkipReport]:
    """Pairs from a local JSON / JSONL file or a hub dataset; `mode` fills rows that carry none.

    A bad row raises `DataError` naming file, line and field; with `skip_bad` it goes into the
    returned report instead (never silently)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown BVPO mode {mode!r}; expected one of {', '.join(MODES)}")
    return convert_source(source, split, lambda r, where, line: pair_from_record(r, where, line, mode),
                          skip_bad=skip_bad, limit=limit)


def write_bvpo_pairs(pairs: list[BVPOPair], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(pair.to_json() + "\n")
