"""Flat sampling: N independent solutions per problem, stored as a tree of depth one."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from treetune.rollouts.engines import Engine, GenerationRequest, SamplingSettings
from treetune.rollouts.stopping import finish_reason_for, request_seed
from treetune.rollouts.tree import ReasoningTree


@dataclass
class FlatSettings:
    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0


class FlatSampler:
    name = "flat"

    def __init__(self, settings: FlatSettings = FlatSettings()):
        self.settings = settings

    def grow(self, engine: Engine, trees: Sequence[ReasoningTree], progress: bool = False) -> Iterator[ReasoningTree]:
        """Fill each (empty) tree with N samples from its root; yields the trees when done."""
        s = self.settings
        requests = [
            GenerationRequest(tree.prompt_ids, SamplingSettings(
                n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                seed=request_seed(s.seed, tree.problem_id, 0)), group=tree.problem_id)
            for tree in trees
        ]
        for tree, result in zip(trees, engine.generate(requests, progress=progress)):
            tree.sampler = {"name": self.name, **asdict(s)}
            for completion in result.completions:
                reason = finish_reason_for(completion.text, completion.text, completion.finish_reason,
                                           len(completion.token_ids), 1, max_response_tokens=s.max_tokens,
                                           stop_on_boxed=False)
                tree.add(0, completion.text, completion.token_ids, completion.logprobs, reason or "length")
            yield tree
