"""`HFEngine`: the engine contract on `transformers.generate`, for machines where vLLM cannot run.

Slower than vLLM (no paged KV cache, no prefix caching) but the same results format: per request
n completions with token ids, text, the processed log-probs of the sampled tokens (after
temperature and top-p, as vLLM's `processed_logprobs`) and a finish reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from treetune.data.pretrained import whole_model_loading
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
from treetune.rollouts.engines.weights import read_folder


class HFEngine:
    def __init__(self, model: str, dtype: str = "auto", device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        with whole_model_loading():  # a whole copy per rank, even under ZeRO-3
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, resolve_dtype(dtype)))
        self.model = self.model.to(self.device).eval()
        self.eos_ids = {self.tokenizer.eos_token_id} | set(
            i for i in ([self.model.generation_config.eos_token_id] if isinstance(self.model.generation_config.eos_token_id, int)
                        else (self.model.generation_config.eos_token_id or [])) if i is not None)
        self.model_name = model
        self.max_model_len = getattr(self.model.config, "max_position_embeddings", None)
        self.counters = EngineCounters()

    def _one(self, request: GenerationRequest) -> RequestResult:
        import torch

        s = request.sampling
        room = fit_max_tokens(request, self.max_model_len)
        if room <= 0:
            return no_room(request)
        prompt = torch.tensor([request.prompt_ids] * s.n, device=self.device)
        greedy = s.temperature == 0
        with torch.random.fork_rng(devices=[] if self.device == "cpu" else None):
            if s.seed is not None:
                torch.manual_seed(s.seed)
            out = self.model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=not greedy,
                temperature=None if greedy else s.temperature,
                top_p=None if greedy else s.top_p,
                top_k=0 if not greedy else None,
                max_new_tokens=room,
                output_scores=True,
                return_dict_in_generate=True,
                synced_gpus=False,  # a whole copy per rank: under ZeRO-3 generate() would otherwise wait on the others
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id,
                stop_strings=list(s.stop) or None,
                tokenizer=self.tokenizer if s.stop else None,
            )
        new = out.sequences[:, prompt.shape[1]:]
        # scores are the processed logits (after temperature / top-p), one tensor per step
        logprobs = (torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.scores], dim=1)
                    if s.logprobs or s.top_logprobs > 0 else None)
        completions = []
        for row in range(s.n):
            ids = new[row].tolist()
            reason = "length"
            for position, token in enumerate(ids):
                if token in self.eos_ids:
                    ids, reason = ids[: position + 1], "stop"
                    break
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if s.stop and any(stop in text for stop in s.stop):
                # generate() pads a row that met a stop string while others ran on (with the pad
                # or the EOS id): keep its tokens only up to the one completing the stop string
                for k in range(1, len(ids) + 1):
                    piece = self.tokenizer.decode(ids[:k], skip_special_tokens=True)
                    stop = next((x for x in s.stop if x in piece), None)
                    if stop is not None:
                        end = piece.index(stop) + (len(stop) if s.include_stop else 0)
                        ids, text, reason = ids[:k], piece[:end], "stop"
                        break
            text = continuation_text(self.tokenizer, request.prompt_ids, ids, text, s.stop, s.include_stop)
            token_logprobs = top = None
            if logprobs is not None and s.logprobs:
                token_logprobs = [float(logprobs[row, i, t]) for i, t in enumerate(ids)]
            if logprobs is not None and s.top_logprobs > 0:
                top = []
                for i in range(len(ids)):
                    values, indices = torch.topk(logprobs[row, i], min(s.top_logprobs, logprobs.shape[-1]))
                    top.append({int(t): float(v) for t, v in zip(indices, values)})
            completions.append(Completion(ids, text, token_logprobs, reason, top))
        return RequestResult(completions, len(request.prompt_ids))

    def generate(self, requests: Sequence[GenerationRequest], progress: bool = False) -> list[RequestResult]:
        from tqdm.auto import tqdm

        results = [self._one(r) for r in tqdm(requests, desc="generating", disable=not progress)]
        self.counters.add(results)
        return results

    def update_weights(self, named_tensors=None, folder: str | None = None) -> None:
        """Generate with new weights from now on: named tensors of the same architecture, or a
        safetensors folder (a sync folder or a `save_pretrained` checkpoint), copied in place. A name
        the model does not have, or a different shape, raises before anything is copied; a name left
        out keeps its weights. A tied output head shares the embeddings' storage, so either name
        updates both (a checkpoint without `lm_head.weight` is fine)."""
        import torch

        if (named_tensors is None) == (folder is None):
            raise ValueError("give either named_tensors or folder")
        tensors = dict(named_tensors if named_tensors is not None else read_folder(folder))
        own = self.model.state_dict()
        unknown = sorted(set(tensors) - set(own))
        if unknown:
            raise KeyError(f"weights the model does not have: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        wrong = [f"{n}: {tuple(t.shape)} vs {tuple(own[n].shape)}" for n, t in tensors.items() if t.shape != own[n].shape]
        if wrong:
            raise ValueError(f"weights of the wrong shape (given vs model): {wrong[:10]}")
        with torch.no_grad():
            self.model.load_state_dict(tensors, strict=False)

    def close(self) -> None:
        self.model = None

    def __enter__(self) -> "HFEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
