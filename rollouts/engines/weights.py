"""Weight sync: a running engine takes a new policy's weights in place, and drops its prefix cache.

Measured on vLLM 0.32 (CPU build), a 4-layer Qwen2 with tied embeddings:
- `model.load_weights(...)` (TRL's colocate path) fails once the model is loaded ("Parameter has
  no attribute weight_loader"): vLLM 0.32 strips the loaders; `model_runner.reload_weights(
  weights_iterator=...)` is the supported in-place path, and after it the engine's log-probs of
  sampled tokens equal the trainer model's to 1e-4.
- With tied embeddings, an in-place reload that is given `model.embed_tokens.weight` but not
  `lm_head.weight` updates the embeddings and leaves the output head on the old weights (log-probs
  0.05-1.5 nats off). `save_pretrained` leaves the tied head out, so `reload_weights(weights_path=
  checkpoint)` goes wrong that way; here the worker reads the safetensors itself and adds the head
  from the embeddings when the model ties them (`TreetuneWeightLoader.treetune_load_folder`), and
  `write_folder` keeps both names.

So there is one mechanism everywhere: named tensors go in through `reload_weights(weights_iterator)`.
In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, or TRL's external launcher) the tensors are handed
over directly; with vLLM's engine-core process, and for `vllm serve` servers, they travel as a
safetensors folder (tmpfs on one machine, shared storage across nodes) whose path goes through
`collective_rpc`, since tensors do not survive that RPC's serialisation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

WORKER_EXTENSION = "treetune.rollouts.engines.weights.TreetuneWeightLoader"
LOAD_METHOD = "treetune_load_folder"


def read_folder(folder: str | Path) -> Iterator[tuple[str, "object"]]:
    """The named tensors of every safetensors file in `folder` (a checkpoint or a sync folder)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors file to load weights from")
    for file in files:
        yield from load_file(str(file)).items()


def write_folder(named_tensors: Iterable[tuple[str, "object"]], folder: str | Path) -> Path:
    """Write tensors as one safetensors file in `folder` (replacing what was there), atomically:
    a reader never sees half a file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for name, tensor in named_tensors:
        tensor = tensor.detach().contiguous().cpu()
        if tensor.data_ptr() in seen:  # a tied weight (lm_head = embeddings): a copy, as safetensors
            tensor = tensor.clone()    # stores no shared memory and the engine needs both names
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    staging = folder / "weights.safetensors.tmp"
    save_file(tensors, str(staging))
    os.replace(staging, folder / "weights.safetensors")
    return folder


def sync_folder(prefix: str = "treetune-sync-") -> Path:
    """A fresh folder for weight handover: in /dev/shm (memory) when it exists, else the temp dir."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def remove_folder(folder: str | Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


class TreetuneWeightLoader:
    """vLLM worker extension (`worker_extension_cls`): named methods callable through
    `collective_rpc`, including a `vllm serve` server's `/collective_rpc` route (string args only)."""

    def treetune_load_folder(self, folder: str) -> int:
        """Reload the weights in place from the safetensors in `folder`; returns the tensor count."""
        tensors = with_tied_head(list(read_folder(folder)), self.model_runner.model_config.hf_config)
        self.model_runner.reload_weights(weights_iterator=iter(tensors))
        return len(tensors)


def with_tied_head(tensors: list[tuple[str, "object"]], hf_config) -> list[tuple[str, "object"]]:
    """`tensors` plus `lm_head.weight` from the input embeddings when the model ties them and the
    head is missing: an in-place reload would otherwise leave the head on the old weights."""
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if not getattr(text_config, "tie_word_embeddings", False):
        return tensors
    names = {name for name, _ in tensors}
    heads = [name for name in names if name.endswith("lm_head.weight")]
    embeddings = [t for name, t in tensors if name.endswith("embed_tokens.weight")]
    if heads or len(embeddings) != 1:
        return tensors
    return tensors + [("lm_head.weight", embeddings[0])]


def in_process_runner(llm):
    """The model runner of an in-process vLLM engine, or None when the engine core runs in its own process."""
    executor = getattr(llm.llm_engine, "model_executor", None)
    if executor is None:
        return None
    worker = getattr(executor, "driver_worker", None)
    return getattr(worker, "model_runner", None) if worker is not None else None


def load_into_llm(llm, named_tensors: Iterable[tuple[str, "object"]] | None = None,
                  folder: str | Path | None = None) -> None:
    """Put new weights into a `vllm.LLM` in place and reset its prefix cache.

    Tensors go straight in when the engine is in-process; otherwise through a folder (`folder`, or
    a temporary one in memory written from `named_tensors`)."""
    if (named_tensors is None) == (folder is None):
        raise ValueError("give either named_tensors or folder")
    runner = in_process_runner(llm)
    if runner is not None:
        tensors = list(named_tensors) if named_tensors is not None else list(read_folder(folder))
        tensors = with_tied_head(tensors, runner.model_config.hf_config)
        runner.reload_weights(weights_iterator=iter(tensors))
    else:
        staging = None
        if folder is None:
            staging = folder = write_folder(named_tensors, sync_folder())
        try:
            llm.collective_rpc(LOAD_METHOD, kwargs={"folder": str(folder)})
        finally:
            remove_folder(staging)
    llm.reset_prefix_cache()
