"""Trees on disk: JSON-lines shards written as trees finish, read back, repaired after a crash.

A run writes `trees-00000.jsonl`, `trees-00001.jsonl`, ... in its folder, one tree a line,
flushed and fsync'ed per tree. If the process is killed mid-write, the last line of the last
shard is incomplete: `TreeWriter` cuts it off when it reopens the folder (and says so), and
reports which problems are already done, so a resumed run neither redoes nor duplicates them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from treetune.data.records import DataError
from treetune.rollouts.tree import ReasoningTree

log = logging.getLogger(__name__)
SHARD_PATTERN = "trees-*.jsonl"


def shard_paths(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob(SHARD_PATTERN))


def _repair(path: Path) -> list[str]:
    """The problem ids of the complete trees in `path`, after cutting off a torn last line.

    Every tree is written as one line ending in a newline, so a write cut short by a kill is
    exactly the bytes after the last newline. A complete line that is not a tree is corruption,
    not an interruption, and raises `DataError`.
    """
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        log.warning("%s: dropping an incompletely written tree (%d bytes) left by an interrupted run",
                    path, len(data) - len(complete))
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    ids = []
    for number, raw in enumerate(complete.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            ids.append(str(json.loads(raw)["problem_id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(path, number, "corrupt tree line (not an interrupted write)") from None
    return ids


class TreeWriter:
    """Appends trees to shards of `shard_size` trees in `directory`; resumable (see module doc)."""

    def __init__(self, directory: str | Path, shard_size: int = 256):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.done: set[str] = set()
        counts = []
        for path in shard_paths(self.directory):
            ids = _repair(path)
            duplicated = self.done.intersection(ids)
            if duplicated:
                raise DataError(path, None, f"trees written twice for problems {sorted(duplicated)[:5]}")
            self.done.update(ids)
            counts.append(len(ids))
        self._index = len(counts) - 1 if counts and counts[-1] < shard_size else len(counts)
        self._in_shard = counts[-1] if counts and counts[-1] < shard_size else 0
        self._handle = None

    def _open(self):
        if self._handle is None:
            path = self.directory / f"trees-{self._index:05d}.jsonl"
            self._handle = path.open("a", encoding="utf-8")
        return self._handle

    def write(self, tree: ReasoningTree) -> None:
        if tree.problem_id in self.done:
            raise ValueError(f"a tree for problem {tree.problem_id!r} is already written")
        handle = self._open()
        handle.write(tree.to_json() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self.done.add(tree.problem_id)
        self._in_shard += 1
        if self._in_shard >= self.shard_size:
            self._handle.close()
            self._handle = None
            self._index += 1
            self._in_shard = 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "TreeWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_trees(path: str | Path) -> Iterator[ReasoningTree]:
    """Trees from one shard file or from every shard of a folder, in order."""
    path = Path(path)
    files = shard_paths(path) if path.is_dir() else [path]
    for file in files:
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield ReasoningTree.from_json(line)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise DataError(file, number, f"not a tree: {err}") from None
