"""The worker side of `treetune.rewards.sandbox`: read a JSON call a line, answer a JSON line.

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


def main() -> None:
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.set_int_max_str_digits(100_000)
    cache: dict = {}
    for line in sys.stdin:
        try:
            request = json.loads(line)
            value = _load(request["fn"], cache)(*request["args"])
            reply = {"ok": True, "value": value}
        except MemoryError:
            reply = {"ok": False, "error": "out of memory"}
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the caller
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                     "trace": traceback.format_exc(limit=3)[-2000:]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
