"""Reading JSON / JSONL record files with errors that name the file, line and field.

`datasets.load_dataset("json")` is the right tool for big files whose schema is known to be good,
but its errors name neither the line nor the field. Problem files are small and often hand-made,
so they are read here line by line: a malformed line or a missing field raises `DataError` naming
all three, or, when the caller asks to skip bad rows, is collected into a report that says how
many were skipped and why.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class DataError(ValueError):
    """A problem with one record of a data file: where it is and what is wrong."""

    def __init__(self, path: str | Path, line: int | None, message: str, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': {message}" if field else message
        super().__init__(f"{where}: {what}")


@dataclass
class SkipReport:
    """Rows left out because the caller asked to skip bad rows; never silent."""

    skipped: list[DataError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        if not self.skipped:
            return "no rows skipped"
        lines = [f"skipped {len(self.skipped)} bad row(s):"]
        lines += [f"  {err}" for err in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) from a .jsonl file, or (item index + 1, record) from a .json array.

    Blank lines are allowed; anything else that is not a JSON object raises `DataError`.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file not found")
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(path, err.lineno, f"invalid JSON ({err.msg})") from None
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise DataError(path, None, "expected a JSON array of objects")
        for index, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                raise DataError(path, index, f"item {index} is a {type(item).__name__}, not an object")
            yield index, item
        return
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(path, number, f"invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DataError(path, number, f"expected a JSON object, got {type(record).__name__}")
            yield number, record


def require(record: dict[str, Any], name: str, path: str | Path, line: int, kind: type | tuple = str) -> Any:
    """Return record[name], or raise `DataError` if it is missing, null or of the wrong type."""
    if name not in record or record[name] is None:
        raise DataError(path, line, "missing", field=name)
    value = record[name]
    if not isinstance(value, kind):
        raise DataError(path, line, f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}", field=name)
    return value


def convert_rows(
    rows: Iterable[tuple[int, dict[str, Any]]],
    convert: Callable[[dict[str, Any], int], T],
    where: str | Path,
    skip_bad: bool = False,
    limit: int | None = None,
    report: SkipReport | None = None,
) -> tuple[list[T], SkipReport]:
    """`convert(record, line)` over (line, record) pairs, up to `limit` converted rows.

    `convert` raises `DataError` (or KeyError / ValueError / TypeError, which are wrapped with
    `where` and the line) for a bad row. With `skip_bad`, bad rows go into the report instead.
    """
    out: list[T] = []
    report = report if report is not None else SkipReport()
    for line, record in rows:
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(convert(record, line))
        except (DataError, KeyError, ValueError, TypeError) as err:
            if not isinstance(err, DataError):
                err = DataError(where, line, str(err))
            if not skip_bad:
                raise err
            report.skipped.append(err)
    return out, report


def convert_source(
    source: str,
    split: str,
    convert: Callable[[dict[str, Any], str, int], T],
    skip_bad: bool = False,
    limit: int | None = None,
) -> tuple[list[T], SkipReport]:
    """`convert(record, where, line)` over a local JSON / JSONL file or, when no such file exists,
    a hub dataset's `split` (rows numbered from 1), as `convert_rows` does."""
    if Path(source).exists():
        return convert_rows(iter_records(source), lambda r, line: convert(r, source, line), source,
                            skip_bad=skip_bad, limit=limit)
    if source.endswith((".jsonl", ".json")):
        raise DataError(source, None, "file not found")
    from datasets import load_dataset

    rows = load_dataset(source, split=split)
    where = f"{source}[{split}]"
    return convert_rows(((i + 1, dict(r)) for i, r in enumerate(rows)), lambda r, line: convert(r, where, line), where,
                        skip_bad=skip_bad, limit=limit)


def read_records(
    path: str | Path,
    convert: Callable[[dict[str, Any], int], T],
    skip_bad: bool = False,
    limit: int | None = None,
) -> tuple[list[T], SkipReport]:
    """Read every record of `path` through `convert(record, line)` (see `convert_rows`).

    A line that is not JSON at all is always fatal, even with `skip_bad`: the rest of the file
    cannot be trusted either.
    """
    return convert_rows(iter_records(path), convert, path, skip_bad, limit)
