"""A pool of sandboxed Python worker processes with a hard time and memory limit per call.

Grading (math-verify, sympy) and tool checks can hang or blow up on hostile input: an answer like
`9^{9^{9^9}}` makes sympy compute an integer with hundreds of millions of digits inside C code,
where no signal can interrupt it. So such calls run in separate worker processes started with
`subprocess` (which works from threads and from daemonic worker processes, where
`multiprocessing` cannot start children). Each worker caps its own address space; a call that
overruns its deadline gets its worker killed and replaced, and comes back as an error, so the
caller always gets an answer within the time bound. The pool is thread-safe.

Only functions named by "module:function" run in the worker; arguments and results travel as
JSON, so no code or pickles cross the boundary.
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass
class CallResult:
    ok: bool
    value: Any = None
    error: str | None = None


class _Worker:
    def __init__(self, memory_mb: int):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "treetune.rewards.sandbox_worker", str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            bufsize=1,
        )

    def call(self, fn: str, args: Sequence[Any], timeout: float) -> CallResult:
        try:
            self.proc.stdin.write(json.dumps({"fn": fn, "args": list(args)}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return CallResult(False, error="worker died before the call")
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return CallResult(False, error=f"timed out after {timeout:g}s")
        line = self.proc.stdout.readline()
        if not line:
            return CallResult(False, error=f"worker died (exit code {self.proc.poll()}), e.g. out of memory")
        reply = json.loads(line)
        return CallResult(reply["ok"], reply.get("value"), reply.get("error"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class SandboxPool:
    """`size` worker processes; `call` runs one function call in one of them, `map` many at once.

    Workers start lazily and live until `close()` (or the end of a `with` block), so their start-up
    (importing sympy, math-verify) is paid once, not per call.
    """

    def __init__(self, size: int = 2, timeout: float = 5.0, memory_mb: int = 2048):
        self.size = max(1, size)
        self.timeout = timeout
        self.memory_mb = memory_mb
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(self.size):
            self._idle.put(None)  # a slot whose worker is started on first use
        self._closed = False
        self._lock = threading.Lock()
        self._all: list[_Worker] = []

    def _spawn(self) -> _Worker:
        worker = _Worker(self.memory_mb)
        with self._lock:
            self._all.append(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)

    def call(self, fn: str, args: Sequence[Any] = (), timeout: float | None = None) -> CallResult:
        """Run `fn(*args)` in a worker; never takes much longer than `timeout` seconds."""
        if self._closed:
            raise RuntimeError("the sandbox pool is closed")
        worker = self._idle.get()
        try:
            if worker is None or not worker.alive():
                if worker is not None:
                    self._retire(worker)
                worker = self._spawn()
            result = worker.call(fn, args, self.timeout if timeout is None else timeout)
            if not result.ok and (result.error or "").startswith(("timed out", "worker died")):
                self._retire(worker)  # a worker stuck in C code cannot be trusted again
                worker = None
            return result
        finally:
            self._idle.put(worker)

    def map(self, fn: str, arg_lists: Iterable[Sequence[Any]], timeout: float | None = None,
            on_done: Callable[[int], None] | None = None) -> list[CallResult]:
        """`call` for every argument list, `size` at a time; results in input order."""
        arg_lists = list(arg_lists)

        def one(args):
            result = self.call(fn, args, timeout)
            if on_done is not None:
                on_done(1)
            return result

        with ThreadPoolExecutor(max_workers=self.size) as executor:
            return list(executor.map(one, arg_lists))

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers, self._all = self._all, []
        for worker in workers:
            worker.kill()

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

