"""Grading a model output against a gold answer with math-verify, bounded in time, in bulk.

`grade(output, gold)` extracts the final answer of `output` (last \\boxed{}, `#### N`, "The answer
is"), and asks math-verify whether it equals `gold`. The comparison runs in a sandboxed worker
process (`treetune.rewards.sandbox.pool`), because math-verify's own timeout uses `signal.alarm`
(main thread only) and cannot interrupt sympy stuck in C code; a worker that overruns is killed
and the answer counts as wrong. That makes grading safe from threads and worker processes, and
`grade_many` spreads a batch over a pool of such workers.

Answers equal as strings (after removing white space) are accepted without a worker call.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence

from treetune.data.answers import extract_answer
from treetune.rewards.sandbox.pool import SandboxPool

DEFAULT_TIMEOUT = 5.0
MAX_ANSWER_CHARS = 2000  # a final answer longer than this is not an answer


def _squash(text: str) -> str:
    return "".join(text.split()).rstrip(".")


_PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def _same_number(a: str, b: str) -> bool | None:
    """For two plain decimal numbers, whether they are equal; None when either is anything else."""
    a, b = _squash(a), _squash(b)
    if _PLAIN_NUMBER.match(a) and _PLAIN_NUMBER.match(b):
        return float(a) == float(b)
    return None


def _as_latex(answer: str) -> str:
    answer = answer.strip()
    if answer.startswith("$") and answer.endswith("$"):
        return answer
    return f"$\\boxed{{{answer}}}$"


def verify_answer(gold: str, predicted: str, timeout: float | None = None) -> bool:
    """math-verify's verdict on two extracted answers (gold first: verify is asymmetric).

    Called inside a sandbox worker, where math-verify's signal-based timeouts also work; pass
    `timeout=None` when calling it from a thread that is not the main one.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    seconds = None if timeout is None else max(1, int(timeout))
    gold_parsed = parse(_as_latex(gold), extraction_config=configs, parsing_timeout=seconds)
    pred_parsed = parse(_as_latex(predicted), extraction_config=configs, parsing_timeout=seconds)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))


verify_answer.sandbox_warmup = ("1/2", "0.5", None)  # run once when a worker starts (math-verify's imports)


def _quick_verdict(output: str, gold: str, shortcut: bool) -> tuple[bool | None, str | None]:
    """(verdict, extracted answer): a verdict when no math-verify call is needed, else None."""
    predicted = extract_answer(output) if isinstance(output, str) else None
    if predicted is None or len(predicted) > MAX_ANSWER_CHARS:
        return False, predicted
    if shortcut and _squash(predicted) == _squash(str(gold)):
        return True, predicted
    return None, predicted


class Grader:
    """Grades outputs against gold answers with a pool of sandboxed math-verify workers.

    `string_shortcut=False` sends every pair to math-verify, even answers equal as strings.
    `processes=0` grades in this process instead (math-verify's own signal timeouts, so only from
    the main thread, and with no hard bound on sympy stuck in C code): the baseline of the
    grading benchmark, not for production use.
    """

    def __init__(self, processes: int | None = None, timeout: float = DEFAULT_TIMEOUT, memory_mb: int = 2048,
                 string_shortcut: bool = True):
        self.string_shortcut = string_shortcut
        self.processes = max(1, min(8, os.cpu_count() or 1)) if processes is None else processes
        self.timeout = timeout
        self.pool = SandboxPool(self.processes, timeout, memory_mb) if self.processes > 0 else None

    def grade(self, output: str, gold: str) -> bool:
        """Whether the final answer of `output` equals `gold`."""
        return self.grade_many([output], [gold])[0]

    def grade_many(self, outputs: Sequence[str], golds: Sequence[str], progress: bool = False) -> list[bool]:
        """`grade` for many (output, gold) pairs, spread over the worker pool; order kept."""
        if len(outputs) != len(golds):
            raise ValueError(f"{len(outputs)} outputs but {len(golds)} gold answers")
        verdicts: list[bool | None] = []
        pending: list[tuple[int, str, str]] = []
        for i, (output, gold) in enumerate(zip(outputs, golds)):
            verdict, predicted = _quick_verdict(output, gold, self.string_shortcut)
            verdicts.append(verdict)
            if verdict is None:
                pending.append((i, str(gold), predicted))
        if not pending:
            return [bool(v) for v in verdicts]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc="grading", unit="answer")
        try:
            if self.pool is None:
                for i, gold, predicted in pending:
                    try:
                        verdicts[i] = verify_answer(gold, predicted, self.timeout)
                    except Exception:  # noqa: BLE001 - a parse failure is a wrong answer
                        verdicts[i] = False
                    if bar is not None:
                        bar.update(1)
            else:
                results = self.pool.map(
                    "treetune.rewards.grading:verify_answer",
                    [(gold, predicted, self.timeout) for _, gold, predicted in pending],
                    timeout=self.timeout + 1.0,
                    on_done=bar.update if bar is not None else None,
                )
                for (i, _, _), result in zip(pending, results):
                    verdicts[i] = bool(result.ok and result.value)
        finally:
            if bar is not None:
                bar.close()
        return [bool(v) for v in verdicts]

    def equivalent_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each pair of extracted answers is the same value (math-verify, first as gold)."""
        verdicts: list[bool | None] = []
        pending = []
        for i, (a, b) in enumerate(pairs):
            quick = _same_number(a, b) if _squash(a) != _squash(b) else True
            verdicts.append(quick)
            if quick is None:
                pending.append(i)
        if pending and self.pool is None:
            for i in pending:
                try:
                    verdicts[i] = verify_answer(pairs[i][0], pairs[i][1], self.timeout)
                except Exception:  # noqa: BLE001
                    verdicts[i] = False
        elif pending:
            results = self.pool.map("treetune.rewards.grading:verify_answer",
                                    [(pairs[i][0], pairs[i][1], self.timeout) for i in pending], timeout=self.timeout + 1.0)
            for i, result in zip(pending, results):
                verdicts[i] = bool(result.ok and result.value)
        return [bool(v) for v in verdicts]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default: Grader | None = None
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The process-wide grader behind `grade` / `grade_many`, started on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader()
        return _default


def grade(output: str, gold: str) -> bool:
    """Whether the final answer of `output` equals `gold` (math-verify, at most ~5 s per call)."""
    return default_grader().grade(output, gold)


def grade_many(outputs: Sequence[str], golds: Sequence[str], progress: bool = False) -> list[bool]:
    """`grade` for many pairs at once, in parallel worker processes; order kept."""
    return default_grader().grade_many(outputs, golds, progress=progress)
