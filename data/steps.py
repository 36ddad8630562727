"""Splitting a solution into reasoning steps: on blank lines, on lines, on `Step k:` markers, or a regex."""

from __future__ import annotations

import re

_STEP_MARKER = re.compile(r"(?im)^\s*step\s*\d+\s*[:.]")
MODES = ("blank_line", "line", "step_k", "regex")
# what follows each step when steps are joined back into a solution (a PRM reads its label there)
SEPARATORS = {"line": "\n", "blank_line": "\n\n", "step_k": "\n"}


def step_separator(mode: str) -> str:
    """The text between two steps of a solution split by `mode` (line, blank_line, step_k)."""
    if mode not in SEPARATORS:
        raise ValueError(f"step mode {mode!r} has no fixed separator; expected one of {', '.join(SEPARATORS)}")
    return SEPARATORS[mode]


def step_ends(text: str, steps: list[str]) -> list[int]:
    """Where each of `steps` (as `split_steps` cut them from `text`) ends in `text`, the white space
    after it included: `text[:end]` is the solution through that step exactly as written (its own
    separators, blank lines and indentation), which a continuation of that step starts after."""
    ends, position = [], 0
    for step in steps:
        start = text.find(step, position)
        if start < 0:
            raise ValueError(f"step {step[:40]!r} is not in the text after position {position}")
        position = start + len(step)
        end = position
        while end < len(text) and text[end].isspace():
            end += 1
        ends.append(end)
    return ends


def split_steps(text: str, mode: str = "blank_line", pattern: str | None = None) -> list[str]:
    """The non-empty steps of `text`, stripped of surrounding white space.

    - `blank_line`: steps are separated by one or more blank lines (MATH, PRM800K, Qwen PRM style);
    - `line`: one step per line (GSM8K gold solutions, the arith task);
    - `step_k`: each step starts with "Step k:" (ThinkPRM / ProcessBench style); the marker is kept;
      text before the first marker, if any, is a step of its own;
    - `regex`: split on `pattern` (a separator regex).
    """
    if mode == "blank_line":
        parts = re.split(r"\n\s*\n", text)
    elif mode == "line":
        parts = text.split("\n")
    elif mode == "step_k":
        starts = [m.start() for m in _STEP_MARKER.finditer(text)]
        if not starts:
            parts = [text]
        else:
            bounds = ([0] if starts[0] > 0 else []) + starts + [len(text)]
            parts = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    elif mode == "regex":
        if not pattern:
            raise ValueError("step mode 'regex' needs a pattern")
        parts = re.split(pattern, text)
    else:
        raise ValueError(f"unknown step mode {mode!r}; expected one of {', '.join(MODES)}")
    return [p.strip() for p in parts if p and p.strip()]
