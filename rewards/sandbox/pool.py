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
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

# A fresh worker may take long to start and import on a busy machine; that is not a hung call.
STARTUP_TIMEOUT = 120.0


@dataclass
class CallResult:
    ok: bool
    value: Any = None
    error: str | None = None


class _Worker:
    def __init__(self, memory_mb: int):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "treetune.rewards.sandbox.worker", str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        self._pending = b""  # bytes read from the worker beyond the last full line
        self.loaded: set[str] = set()

    def load(self, fn: str, timeout: float) -> CallResult:
        """Start-up and the import of `fn`'s module, bounded by its own (generous) `timeout`, so a
        busy machine's slow start is never mistaken for a hung call."""
        try:
            self.proc.stdin.write((json.dumps({"fn": fn, "load": True}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return CallResult(False, error="worker died before the call")
        line = self._read_line(timeout)
        if line is None:
            return CallResult(False, error=f"timed out after {timeout:g}s starting the worker")
        if not line:
            return CallResult(False, error="worker died while starting")
        reply = json.loads(line)
        if reply["ok"]:
            self.loaded.add(fn)
        return CallResult(reply["ok"], error=reply.get("error"))

    def call_batch(self, fn: str, arg_lists: Sequence[Sequence[Any]], timeout: float) -> list[CallResult]:
        """Run `fn` on each argument list in turn; each result must arrive within `timeout`.

        Returns the results up to and including the first call that timed out or killed the
        worker; the caller retries the rest elsewhere.
        """
        try:
            self.proc.stdin.write((json.dumps({"fn": fn, "batch": [list(a) for a in arg_lists]}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return [CallResult(False, error="worker died before the call")]
        results: list[CallResult] = []
        for _ in arg_lists:
            line = self._read_line(timeout)
            if line is None:
                results.append(CallResult(False, error=f"timed out after {timeout:g}s"))
                return results
            if not line:
                self.proc.wait()
                results.append(CallResult(False, error=f"worker died (exit code {self.proc.returncode}), e.g. out of memory"))
                return results
            reply = json.loads(line)
            results.append(CallResult(reply["ok"], reply.get("value"), reply.get("error")))
        return results

    def _read_line(self, timeout: float) -> bytes | None:
        """The next line from the worker; b"" at end of stream, None if none came within `timeout`.

        Reads the raw pipe itself: a buffered reader could hold the next answers in its buffer
        where `select` cannot see them.
        """
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

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

    def _run_chunk(self, fn: str, arg_lists: Sequence[Sequence[Any]], timeout: float,
                   on_done: Callable[[int], None] | None) -> list[CallResult]:
        """All of `arg_lists` through one worker, replacing it whenever a call hangs or kills it."""
        worker = self._idle.get()
        results: list[CallResult] = []
        try:
            while len(results) < len(arg_lists):
                if worker is None or not worker.alive():
                    if worker is not None:
                        self._retire(worker)
                    worker = self._spawn()
                if fn not in worker.loaded:
                    started = worker.load(fn, STARTUP_TIMEOUT)
                    if not started.ok:  # the function cannot even be loaded: every call fails alike
                        self._retire(worker)
                        worker = None
                        results += [started] * (len(arg_lists) - len(results))
                        if on_done is not None:
                            on_done(len(arg_lists))
                        break
                got = worker.call_batch(fn, arg_lists[len(results):], timeout)
                results += got
                if on_done is not None:
                    on_done(len(got))
                last = got[-1]
                if not last.ok and (last.error or "").startswith(("timed out", "worker died")):
                    self._retire(worker)  # a worker stuck in C code cannot be trusted again
                    worker = None
            return results
        finally:
            self._idle.put(worker)

    def call(self, fn: str, args: Sequence[Any] = (), timeout: float | None = None) -> CallResult:
        """Run `fn(*args)` in a worker; never takes much longer than `timeout` seconds."""
        if self._closed:
            raise RuntimeError("the sandbox pool is closed")
        return self._run_chunk(fn, [args], self.timeout if timeout is None else timeout, None)[0]

    def map(self, fn: str, arg_lists: Iterable[Sequence[Any]], timeout: float | None = None,
            on_done: Callable[[int], None] | None = None, chunk_size: int = 64) -> list[CallResult]:
        """`fn` on every argument list, in chunks spread over the workers; results in input order.

        Each call still has its own time bound: a worker answers call by call, and one that
        overruns is replaced and the rest of its chunk goes on in the new worker.
        """
        if self._closed:
            raise RuntimeError("the sandbox pool is closed")
        arg_lists = list(arg_lists)
        if not arg_lists:
            return []
        per_call = self.timeout if timeout is None else timeout
        size = max(1, min(chunk_size, -(-len(arg_lists) // (self.size * 4))))
        chunks = [arg_lists[i:i + size] for i in range(0, len(arg_lists), size)]
        with ThreadPoolExecutor(max_workers=self.size) as executor:
            done = executor.map(lambda chunk: self._run_chunk(fn, chunk, per_call, on_done), chunks)
            return [result for chunk_results in done for result in chunk_results]

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

