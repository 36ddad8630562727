"""The sandboxed worker pool: hung and hostile calls come back as errors, and the pool goes on."""

from __future__ import annotations

import threading
import time

from treetune.rewards.sandbox.pool import SandboxPool

VERIFY = "treetune.rewards.grading:verify_answer"


def test_only_treetune_functions_run():
    with SandboxPool(size=1) as pool:
        result = pool.call("os:system", ["echo hi"])
        assert not result.ok and "PermissionError" in result.error


def test_a_hung_call_times_out_and_the_rest_of_the_batch_goes_on():
    with SandboxPool(size=1, timeout=3) as pool:
        started = time.monotonic()
        results = pool.map(VERIFY, [("2", "2", None), ("3", "9^{9^{9^{9}}}", None), ("0.5", "\\frac12", None)])
        assert [r.ok for r in results] == [True, False, True]
        assert results[0].value is True and results[2].value is True
        assert results[1].error.startswith("timed out")
        assert time.monotonic() - started < 30  # worker start-up + one 3 s timeout + the rest


def test_memory_limit_contains_a_blow_up():
    # 300 MB cannot hold sympy evaluating a tower of powers: the worker fails or dies, the
    # caller gets an error, and the next call gets a fresh worker.
    with SandboxPool(size=1, timeout=20, memory_mb=300) as pool:
        blown = pool.call(VERIFY, ["1", "9^{9^{9}}", None])
        assert not blown.ok or blown.value is False
        after = pool.call(VERIFY, ["2", "2", None])
        assert after.ok and after.value is True


def test_errors_come_back_as_messages():
    with SandboxPool(size=1) as pool:
        result = pool.call(VERIFY, ["1"])  # missing argument
        assert not result.ok and "TypeError" in result.error


def test_pool_is_thread_safe():
    with SandboxPool(size=2) as pool:
        out = {}

        def work(i):
            out[i] = pool.call(VERIFY, [str(i), f"{i}/1", None]).value

        threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == {i: True for i in range(12)}
