"""Grading with math-verify on the real GSM8K and MATH-500 gold solutions, and on hostile input."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
from treetune.data import load_problems
from treetune.data.answers import last_boxed
from treetune.rewards.grading import DEFAULT_TIMEOUT, Grader, grade


@pytest.fixture(scope="module")
def grader():
    # string_shortcut=False: every pair really goes through math-verify.
    with Grader(processes=2, string_shortcut=False) as g:
        yield g


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    return load_problems("gsm8k", "test", path=shared_data / "gsm8k" / "test.jsonl")


@pytest.fixture(scope="module")
def math500(shared_data):
    return load_problems("math500", "test", path=shared_data / "math500" / "test.jsonl")


def test_gsm8k_gold_solutions_grade_correct(grader, gsm8k):
    assert len(gsm8k) == 1319
    verdicts = grader.grade_many([p.solution for p in gsm8k], [p.answer for p in gsm8k])
    wrong = [p.id for p, ok in zip(gsm8k, verdicts) if not ok]
    assert wrong == []


def test_math500_gold_solutions_grade_correct(grader, math500):
    assert len(math500) == 500
    verdicts = grader.grade_many([p.solution for p in math500], [p.answer for p in math500])
    wrong = [(p.id, p.answer, last_boxed(p.solution)) for p, ok in zip(math500, verdicts) if not ok]
    assert wrong == []


def _replace_final(solution: str, old: str, new: str) -> str:
    head, sep, tail = solution.rpartition(old)
    assert sep, "the answer must appear in the solution"
    return head + new + tail


def test_gsm8k_changed_answers_grade_wrong(grader, gsm8k):
    changed = [p.solution.rpartition("####")[0] + f"#### {float(p.answer) + 1:g}" for p in gsm8k]
    verdicts = grader.grade_many(changed, [p.answer for p in gsm8k])
    assert not any(verdicts)


def test_math500_changed_answers_grade_wrong(grader, math500):
    # Each solution's last boxed answer is replaced by "(answer)+1", a different value whatever the
    # answer is (number, expression, interval...), or unparsable, which must also grade wrong.
    # An equation answer ("x=5") gets its right-hand side changed.
    changed = []
    for p in math500:
        boxed = last_boxed(p.solution)
        lhs, eq, rhs = boxed.rpartition("=")
        new = f"{lhs}{eq}({rhs})+1"
        changed.append(_replace_final(p.solution, "\\boxed{" + boxed + "}", "\\boxed{" + new + "}"))
    verdicts = grader.grade_many(changed, [p.answer for p in math500])
    right = [(p.id, p.answer) for p, ok in zip(math500, verdicts) if ok]
    assert right == []


@pytest.mark.parametrize("output", [
    "",
    "I do not know.",
    "\\boxed{12",
    "}}}{{{\\boxed{",
    "x" * 10_000_000 + " \\boxed{6",
    "\\boxed{9^{9^{9^{9}}}}",
])
def test_malformed_outputs_are_wrong_within_the_time_bound(grader, output):
    started = time.monotonic()
    assert grader.grade(output, "5") is False
    assert time.monotonic() - started < DEFAULT_TIMEOUT + 3


def test_a_hung_worker_is_replaced(grader):
    assert grader.grade("\\boxed{9^{9^{9^{9}}}}", "3") is False
    assert grader.grade("\\boxed{\\frac{1}{2}}", "0.5") is True


def test_equivalent_forms_are_accepted(grader):
    assert grader.grade("so \\boxed{\\frac{1}{2}}", "0.5")
    assert grader.grade("The answer is 1/2", "\\frac12")
    assert grader.grade("#### 1,000", "1000")
    assert not grader.grade("\\boxed{2}", "3")


def test_grade_from_threads():
    results = {}

    def work(i):
        results[i] = grade(f"\\boxed{{{i}/2}}", f"\\frac{{{i}}}{{2}}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: True for i in range(1, 9)}


def _grade_in_daemon(queue):
    with Grader(processes=1) as g:
        queue.put(g.grade_many(["\\boxed{\\sqrt{4}}", "\\boxed{3}"], ["2", "2"]))


def test_grade_from_a_daemonic_worker_process():
    # multiprocessing workers are daemonic and may not fork children of their own; the grader's
    # subprocess workers still start there.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_grade_in_daemon, args=(queue,), daemon=True)
    proc.start()
    assert queue.get(timeout=60) == [True, False]
    proc.join(10)


def test_in_process_grading_matches_the_pool(math500):
    with Grader(processes=0, string_shortcut=False) as local:
        sample = math500[:40]
        assert all(local.grade_many([p.solution for p in sample], [p.answer for p in sample]))
