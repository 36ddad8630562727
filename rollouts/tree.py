"""The reasoning tree: one problem and a flat list of nodes, each adding a piece of text.

Node 0 is the root (the prompt, no text of its own). Every other node is a TreePO segment, an
MCTS step or a whole flat sample, and a root-to-leaf path is one full solution. A node records
the text and token ids it added, the log-probs of those sampled tokens, its depth, why it ended
(`finish_reason`, set on finished leaves: "eos", "boxed", "length", "repetition", "depth"), and an
open `scores` mapping that reward modules fill ("outcome", "prm", "mc", "visits", "q", ...).

Trees serialise to one JSON object a line (`to_json` / `from_json`), carrying the schema version
and the settings of the sampler that grew them, so `datasets.load_dataset("json", ...)` reads a
folder of tree shards as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class Node:
    id: int
    parent: int | None
    depth: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ReasoningTree:
    problem_id: str
    prompt: str
    prompt_ids: list[int]
    answer: str
    nodes: list[Node] = field(default_factory=list)
    sampler: dict[str, Any] = field(default_factory=dict)
    problem: dict[str, Any] = field(default_factory=dict)  # the source's extra fields (arith ops, MATH level...)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes.append(Node(id=0, parent=None, depth=0))
        self._children: dict[int, list[int]] = {}
        for node in self.nodes[1:]:
            self._children.setdefault(node.parent, []).append(node.id)

    # -- building -------------------------------------------------------------------------
    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add(self, parent: int, text: str, token_ids: list[int], logprobs: list[float] | None = None,
            finish_reason: str | None = None, **scores: Any) -> Node:
        """Append a child of `parent` and return it."""
        node = Node(id=len(self.nodes), parent=parent, depth=self.nodes[parent].depth + 1, text=text,
                    token_ids=list(token_ids), logprobs=None if logprobs is None else list(logprobs),
                    finish_reason=finish_reason, scores=dict(scores))
        self.nodes.append(node)
        self._children.setdefault(parent, []).append(node.id)
        return node

    # -- navigation -----------------------------------------------------------------------
    def children(self, node_id: int) -> list[Node]:
        return [self.nodes[i] for i in self._children.get(node_id, [])]

    def is_leaf(self, node_id: int) -> bool:
        return node_id != 0 and not self._children.get(node_id)

    def leaves(self, finished_only: bool = True) -> list[Node]:
        """Leaves in node order; by default only finished ones (whole trajectories)."""
        return [n for n in self.nodes[1:] if self.is_leaf(n.id) and (n.finished or not finished_only)]

    def path(self, node_id: int) -> list[Node]:
        """Nodes from the root's first child down to `node_id` (the root itself adds nothing)."""
        out = []
        node = self.nodes[node_id]
        while node.parent is not None:
            out.append(node)
            node = self.nodes[node.parent]
        return out[::-1]

    def path_text(self, node_id: int) -> str:
        return "".join(n.text for n in self.path(node_id))

    def path_token_ids(self, node_id: int) -> list[int]:
        return [t for n in self.path(node_id) for t in n.token_ids]

    def path_logprobs(self, node_id: int) -> list[float]:
        return [lp for n in self.path(node_id) for lp in (n.logprobs or [])]

    def siblings(self, node_id: int) -> list[Node]:
        """The other children of this node's parent."""
        parent = self.nodes[node_id].parent
        if parent is None:
            return []
        return [n for n in self.children(parent) if n.id != node_id]

    def subtree(self, node_id: int) -> list[Node]:
        """This node and all its descendants, parents before children."""
        out, stack = [], [node_id]
        while stack:
            current = stack.pop()
            out.append(self.nodes[current])
            stack.extend(reversed(self._children.get(current, [])))
        return out

    def leaves_under(self, node_id: int, finished_only: bool = True) -> list[Node]:
        return [n for n in self.subtree(node_id) if self.is_leaf(n.id) and (n.finished or not finished_only)]

    def iter_trajectories(self) -> Iterator[tuple[Node, str]]:
        """(leaf, full solution text) for every finished trajectory."""
        for leaf in self.leaves():
            yield leaf, self.path_text(leaf.id)

    def decoded_tokens(self) -> int:
        """Tokens the engine generated for this tree (shared prefixes counted once)."""
        return sum(len(n.token_ids) for n in self.nodes)

    # -- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "problem_id": self.problem_id,
            "prompt": self.prompt,
            "prompt_ids": self.prompt_ids,
            "answer": self.answer,
            "sampler": self.sampler,
            "problem": self.problem,
            "nodes": [asdict(n) for n in self.nodes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReasoningTree":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"tree schema version {version!r} is not {SCHEMA_VERSION}")
        nodes = [Node(**{k: n.get(k) for k in Node.__dataclass_fields__ if k in n}) for n in data["nodes"]]
        for node in nodes:  # datasets fills absent keys of an open mapping with None
            node.scores = {k: v for k, v in (node.scores or {}).items() if v is not None}
            node.token_ids = list(node.token_ids or [])
        return cls(problem_id=str(data["problem_id"]), prompt=data["prompt"], prompt_ids=list(data["prompt_ids"]),
                   answer=str(data["answer"]), nodes=nodes, sampler=data.get("sampler") or {},
                   problem=data.get("problem") or {}, schema_version=version)

    @classmethod
    def from_json(cls, line: str) -> "ReasoningTree":
        return cls.from_dict(json.loads(line))
