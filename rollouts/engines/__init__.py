"""Engines: token-in / token-out generation backends (vLLM in-process, transformers)."""

from .base import Completion, Engine, EngineCounters, GenerationRequest, RequestResult, SamplingSettings

__all__ = ["Completion", "Engine", "EngineCounters", "GenerationRequest", "HFEngine", "RequestResult", "SamplingSettings", "VLLMEngine"]


def __getattr__(name):  # heavy backends are imported only when an engine is actually built
    if name == "VLLMEngine":
        from .vllm_engine import VLLMEngine

        return VLLMEngine
    if name == "HFEngine":
        from .hf_engine import HFEngine

        return HFEngine
    raise AttributeError(name)
