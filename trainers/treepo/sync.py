"""The trainer's weights into the rollout engine, at every generation boundary.

`EngineWeightSync` stands where TRL's `VLLMGeneration` stands in `GRPOTrainer`: TRL calls its
`sync_weights()` before a generation whenever the optimizer step has moved, so the engine always
samples from the current policy and a tree never mixes two policies. The weights are gathered
under ZeRO-3 (every rank takes part), LoRA adapters are merged for the copy and unmerged after,
names are the checkpoint's; then each rank's own engine loads them in place, or, for a pool of
`vllm serve` servers shared by all ranks, the main process writes them where the servers can read
them and every server reloads (`treetune.rollouts.engines.weights`). Engines reset their prefix
cache on every update.

With TRL's own vLLM (`--use_vllm true`, GPUs) TRL's `VLLMGeneration` does the sync (per-parameter
`load_weights` in colocate mode, NCCL weight transfer in server mode, each followed by a prefix-cache
reset) and `trl_engine` gives the tree sampler the same vLLM: the colocated `LLM`, or the server
through its OpenAI API. `TimedSync` times whichever does the work.
"""

from __future__ import annotations

import contextlib
import time

from treetune.rollouts.engines import VLLMEngine, VLLMServerPool
from treetune.rollouts.engines.weights import remove_folder, sync_folder, write_folder


def _gathered(accelerator, params):
    """A context in which ZeRO-3-partitioned `params` are whole on every rank (no-op otherwise)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    return contextlib.nullcontext()


def policy_weights(accelerator, model) -> list[tuple[str, "object"]]:
    """(checkpoint name, full tensor copy) of every weight of the trained policy, on every rank."""
    from peft import PeftModel

    unwrapped = accelerator.unwrap_model(model)
    if isinstance(unwrapped, PeftModel):
        out = []
        with _gathered(accelerator, unwrapped.parameters()):
            unwrapped.merge_adapter()
            try:
                for name, param in unwrapped.named_parameters():
                    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                    if unwrapped.prefix in name or "original_module" in name:
                        continue  # LoRA factors (merged already) and the copies modules_to_save replaced
                    out.append((name.replace("modules_to_save.default.", ""), param.detach().clone()))
            finally:
                unwrapped.unmerge_adapter()
        return out
    out = []
    for bucket in _buckets(list(unwrapped.named_parameters())):
        with _gathered(accelerator, [param for _, param in bucket]):
            out += [(name, param.detach().clone()) for name, param in bucket]
    return out


BUCKET_BYTES = 256 * 1024**2


def _buckets(named_params, limit: int = BUCKET_BYTES):
    """Parameters in groups of at most `limit` bytes when whole: one ZeRO-3 gather per group rather than
    per tensor (the tiny policy under ZeRO-3 with 2 ranks on 2 CPU cores: 0.95 s a sync one tensor at a
    time, most of it the ~50 collectives' latency; 0.41 s in one bucket)."""
    bucket, size = [], 0
    for name, param in named_params:
        nbytes = getattr(param, "ds_numel", param.numel()) * param.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, param))
        size += nbytes
    if bucket:
        yield bucket


class TimedSync:
    """`sync_weights()` of `inner` (TRL's `VLLMGeneration` or an `EngineWeightSync`), counted and timed;
    every other attribute is the inner object's."""

    def __init__(self, inner):
        self.inner, self.syncs, self.seconds, self.last_seconds = inner, 0, 0.0, 0.0

    def sync_weights(self) -> None:
        start = time.perf_counter()
        self.inner.sync_weights()
        self.last_seconds = time.perf_counter() - start
        self.syncs += 1
        self.seconds += self.last_seconds

    def __getattr__(self, name):
        return getattr(self.inner, name)


def trl_engine(trainer):
    """A treetune engine over TRL's own vLLM: the colocated `LLM` of this rank, or the `vllm serve`
    server TRL syncs over NCCL (reached here through its OpenAI API, one URL)."""
    args = trainer.args
    if args.vllm_mode == "colocate":
        return VLLMEngine.from_llm(trainer.vllm_generation.llm, trainer.model.config._name_or_path)
    url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
    return VLLMServerPool([url], model=trainer.model.config._name_or_path)


class EngineWeightSync:
    """`sync_weights()` for `GRPOTrainer`: the trained policy into `engine` (see the module doc).

    `shared=True` means one engine serves every rank (a server pool): only the main process pushes,
    through `folder` when given (shared storage across nodes), and all ranks wait for it."""

    def __init__(self, trainer, engine, shared: bool = False, folder: str | None = None):
        self.trainer, self.engine, self.shared, self.folder = trainer, engine, shared, folder

    def sync_weights(self) -> None:
        accelerator = self.trainer.accelerator
        weights = policy_weights(accelerator, self.trainer.model)
        if not self.shared:
            self.engine.update_weights(named_tensors=weights)
        elif accelerator.is_main_process:
            staging = None if self.folder else sync_folder()
            try:
                self.engine.update_weights(folder=str(write_folder(weights, self.folder or staging)))
            finally:
                remove_folder(staging)
        if self.shared:
            accelerator.wait_for_everyone()
