"""Engines: token-in / token-out generation backends (vLLM in-process; more to come)."""

from .base import Completion, Engine, GenerationRequest, RequestResult, SamplingSettings

__all__ = ["Completion", "Engine", "GenerationRequest", "RequestResult", "SamplingSettings", "VLLMEngine"]


def __getattr__(name):  # vLLM is imported only when an engine is actually built
    if name == "VLLMEngine":
        from .vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(name)
