"""Engines: token-in / token-out generation backends (vLLM in-process, a pool of `vllm serve`
servers, transformers). Each imports its heavy backend only when an engine is built."""

from treetune.rollouts.engines.base import (
    Completion,
    Engine,
    EngineCounters,
    GenerationRequest,
    RequestResult,
    SamplingSettings,
)
from treetune.rollouts.engines.hf_engine import HFEngine
from treetune.rollouts.engines.server_pool import VLLMServerPool
from treetune.rollouts.engines.vllm_engine import VLLMEngine

__all__ = ["Completion", "Engine", "EngineCounters", "GenerationRequest", "HFEngine", "RequestResult",
           "SamplingSettings", "VLLMEngine", "VLLMServerPool"]
