"""The one record type every data source turns into: a problem with its gold answer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Problem:
    """A problem to solve.

    `answer` is the gold final answer as a string (what grading compares against); `solution`
    is a gold worked solution when the source has one. `extra` keeps source-specific fields
    (MATH subject and level, arith step count, ...) so nothing the source offered is lost.
    """

    id: str
    question: str
    answer: str
    solution: str | None = None
    source: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Problem":
        return cls(
            id=str(row["id"]),
            question=row["question"],
            answer=str(row["answer"]),
            solution=row.get("solution"),
            source=row.get("source", "unknown"),
            extra=dict(row.get("extra") or {}),
        )
