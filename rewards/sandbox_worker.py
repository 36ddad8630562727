"""The worker side of `treetune.rewards.sandbox`: read a batch of calls a line, answer a line a call.

Started as `python -m treetune.rewards.sandbox_worker MEMORY_MB`. It caps its own address space
first, then serves calls to functions named "module:function" until stdin closes.
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import traceback


def _load(name: str, cache: dict):
    if name not in cache:
        module, _, function = name.partition(":")
        if not module.startswith("treetune."):
            raise PermissionError(f"only treetune functions may run in the sandbox, not {name!r}")
        cache[name] = getattr(importlib.import_module(module), function)
    return cache[name]


def _serve(fn: str, args: list, cache: dict) -> dict:
    try:
        return {"ok": True, "value": _load(fn, cache)(*args)}
    except MemoryError:
        return {"ok": False, "error": "out of memory"}
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the caller
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                "trace": traceback.format_exc(limit=3)[-2000:]}


def main() -> None:
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.set_int_max_str_digits(100_000)
    cache: dict = {}
    for line in sys.stdin:
        request = json.loads(line)
        for args in request["batch"]:
            sys.stdout.write(json.dumps(_serve(request["fn"], args, cache)) + "\n")
            sys.stdout.flush()  # one answer a line, as soon as it is known: the caller times each one


if __name__ == "__main__":
    main()
