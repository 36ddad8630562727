"""Folders built once and cached: $TREETUNE_CACHE (else ~/.cache/treetune), one folder per build key.

A file lock makes concurrent callers (test workers, ranks of a distributed job) wait for one build;
the build writes into a staging folder that is renamed into place only when it succeeded, so a
killed build is never taken for a finished one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """Where built artefacts are cached: $TREETUNE_CACHE, else ~/.cache/treetune."""
    return Path(os.environ.get("TREETUNE_CACHE") or Path.home() / ".cache" / "treetune")


def build_once(target: Path, build: Callable[[Path], None], done_marker: str = "config.json") -> Path:
    """`target`, built by `build(staging)` unless it already holds `done_marker`."""
    from filelock import FileLock

    if (target / done_marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / done_marker).exists():
            return target
        staging = target.parent / f".{target.name}.building"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        build(staging)
        if not (staging / done_marker).exists():
            raise RuntimeError(f"building {target.name} left no {done_marker} in {staging}")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target
