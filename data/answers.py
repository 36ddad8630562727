"""Finding the final answer in a solution text: the last \\boxed{}, GSM8K's `#### N`, "The answer is".

Extraction is plain string scanning, linear in the text and safe on any input (a 10 MB output,
unbalanced braces); deciding whether two answers are equal is the grader's job (math-verify).
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_GSM8K_ANSWER = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"answer is[:\s]*", re.IGNORECASE)


def _braced_from(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start] == '{', or None if never closed."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed N`) in `text`."""
    search_end = len(text)
    while True:
        pos = max(text.rfind(cmd, 0, search_end) for cmd in _BOX_COMMANDS)
        if pos < 0:
            return None
        cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, pos))
        after = pos + len(cmd)
        rest = text[after : after + 1]
        if rest == "{":
            content = _braced_from(text, after)
            if content is not None:
                return content.strip()
        elif rest == " ":  # "\boxed 5" (seen in some MATH solutions)
            token = text[after + 1 :].split("$", 1)[0].split()
            if token:
                return token[0].strip()
        search_end = pos  # unbalanced: try an earlier box


def gsm8k_answer(text: str) -> str | None:
    """The answer after the last `####` marker, with thousands separators and `$` removed."""
    matches = _GSM8K_ANSWER.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip().replace(",", "").replace("$", "").strip()
    return answer.rstrip(".") or None


def answer_is(text: str) -> str | None:
    """The value after the last "The answer is" (its first line, trailing period removed)."""
    found = list(_ANSWER_IS.finditer(text))
    if not found:
        return None
    tail = text[found[-1].end() :].split("\n", 1)[0].strip()
    tail = tail.strip("$ ").rstrip(".").strip()
    return tail or None


def extract_answer(text: str) -> str | None:
    """The final answer of a model output or gold solution, or None when it states none.

    Order: the last complete \\boxed{} (MATH, Qwen-Math and the arith task all box the answer),
    then GSM8K's `#### N`, then "The answer is X".
    """
    if not isinstance(text, str) or not text:
        return None
    for finder in (last_boxed, gsm8k_answer, answer_is):
        found = finder(text)
        if found:
            return found
    return None


_CALCULATOR = re.compile(r"<<[^<>\n]*>>")


def gsm8k_boxed_solution(text: str) -> str:
    """A GSM8K gold solution in the format treetune's prompts ask for: the calculator annotations
    (`<<48/2=24>>`, made for a calculator tool the model never has) removed and the final `#### N`
    line written as "The answer is \\boxed{N}.", so SFT on GSM8K teaches what the instruction says."""
    answer = gsm8k_answer(text)
    body = _CALCULATOR.sub("", text)
    if answer is None:
        return body
    head = body[: body.rfind("####")].rstrip()
    return f"{head}\nThe answer is \\boxed{{{answer}}}." if head else f"The answer is \\boxed{{{answer}}}."
