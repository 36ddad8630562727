"""The engine protocol: a batch of requests (prompt token ids + sampling settings) in, per request
the completions' token ids, text, sampled-token log-probs and finish reasons out."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

# CPU flags that mean bf16 matrix maths runs natively (x86: AVX512-BF16 or AMX; Arm: BF16)
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@cache
def native_bf16() -> bool:
    """Whether bf16 is native here: a CUDA device that supports it, else a CPU with bf16 instructions.
    Where it is not, bf16 is emulated and several times slower than float32 (4x measured for vLLM)."""
    try:
        import torch

        if torch.cuda.is_available():
            return bool(torch.cuda.is_bf16_supported())
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return bool(NATIVE_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() == "arm64"  # Apple silicon (M2 and later) has BF16; no /proc there


def resolve_dtype(requested: str | None = "auto") -> str:
    """The compute dtype: the user's choice, else bfloat16 where it is native and float32 elsewhere."""
    if requested and requested != "auto":
        return requested
    return "bfloat16" if native_bf16() else "float32"


@dataclass
class SamplingSettings:
    """How to sample. `temperature=0` is greedy (and then `n` must be 1)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: bool = True
    include_stop: bool = False  # keep the matched stop string at the end of the text (step search needs it)
    top_logprobs: int = 0  # also return the k likeliest tokens' log-probs at each generated position (verifiers read P(yes))

    def __post_init__(self) -> None:
        if self.temperature == 0 and self.n != 1:
            raise ValueError("greedy decoding (temperature 0) gives one completion; set n=1")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    group: str | None = None  # requests of one group (a tree) share prefixes: engines keep them together


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    top_logprobs: list[dict[int, float]] | None = None  # per position: token id -> log-prob, when asked


@dataclass
class RequestResult:
    completions: list[Completion]
    prompt_tokens: int = 0


@dataclass
class EngineCounters:
    """Running totals an engine keeps, for summaries (prompt tokens as sent, before prefix caching)."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def add(self, results: Sequence[RequestResult]) -> None:
        self.requests += len(results)
        self.prompt_tokens += sum(r.prompt_tokens for r in results)
        self.generated_tokens += sum(len(c.token_ids) for r in results for c in r.completions)


def fit_max_tokens(request: GenerationRequest, context: int | None) -> int:
    """The request's max_tokens, cut so prompt + completion fit the engine's context (may be <= 0)."""
    if context is None:
        return request.sampling.max_tokens
    return min(request.sampling.max_tokens, context - len(request.prompt_ids))


TORN = "\ufffd"  # what a tokenizer decodes the bytes of an unfinished character to


def continuation_text(tokenizer, prompt_ids: Sequence[int], token_ids: Sequence[int], text: str,
                      stop: Sequence[str] = (), include_stop: bool = False) -> str:
    """The text `token_ids` add after `prompt_ids`, where the prompt ends inside a character.

    A byte-level BPE spells rare characters (emoji, CJK, some maths symbols) over several tokens, so
    a TreePO segment or a search step can end between them, and the next request's prompt then ends
    with a torn character. Engines decode a completion on its own, which goes wrong there (vLLM
    returns the whole prompt's text in front of the completion; a plain decode starts with U+FFFD).
    Decoding the last prompt tokens with the completion and cutting off the text they make alone
    (less the torn character) gives the completion's own text; a completion that itself ends inside
    a character leaves it to the next, as vLLM does. `text` comes back unchanged when the prompt
    ends on a whole character."""
    tail = list(prompt_ids[-8:])  # a character is at most 4 bytes, so at most 4 tokens
    before = tokenizer.decode(tail, skip_special_tokens=True)
    if not before.endswith(TORN):
        return text
    before = before.rstrip(TORN)
    after = tokenizer.decode(tail + list(token_ids), skip_special_tokens=True)
    if not after.startswith(before):
        return text
    fixed = after[len(before):].rstrip(TORN)
    cuts = [fixed.find(s) + (len(s) if include_stop else 0) for s in stop if s and s in fixed]
    return fixed[:min(cuts)] if cuts else fixed


def no_room(request: GenerationRequest) -> RequestResult:
    """The result for a prompt that leaves no room to generate: n empty completions cut by length."""
    return RequestResult([Completion([], "", [] if request.sampling.logprobs else None, "length")
                          for _ in range(request.sampling.n)], len(request.prompt_ids))


class Engine(Protocol):
    counters: EngineCounters
    max_model_len: int | None

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = False) -> list[RequestResult]:
        """Results in request order."""
        ...
