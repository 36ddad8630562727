"""Distributed training under `accelerate launch`, on GPUs and on a CPU-only machine alike.

On GPUs nothing here changes anything: the configs in `configs/accelerate/` work as they are.

On a machine without an accelerator, accelerate 1.15 mis-detects a process started by torchrun or
DeepSpeed's launcher (`LOCAL_RANK` set, `cpu` not): `PartialState._prepare_backend` finds no
CUDA/XPU/NPU/... device and returns backend `None`, `DistributedType.NO`. The process group still
gets opened (by `deepspeed.comm.init_distributed` under a DeepSpeed config, by
`torch.distributed.init_process_group(backend=None)` otherwise, both with 2 ranks), but because the
backend is `None` accelerate records `num_processes = 1`. Measured with 2 processes:
- DeepSpeed configs: the trainer sizes DeepSpeed's global batch for one process, so
  `deepspeed.initialize` stops on its batch check ("train_batch_size is not equal to
  micro_batch_per_gpu * gradient_acc_step * world_size 2 != 2 * 1 * 2"): in TRL's
  `prepare_deepspeed` for the DPO reference model, or in `accelerator.prepare` for SFT.
- DDP (MULTI_GPU) configs: each rank trains an unwrapped model alone, as if it were the only one.
- No switch avoids it: `accelerate launch --cpu` with a DeepSpeed config takes the plain launcher,
  which starts one process without DeepSpeed; `use_cpu: true` in the config is not passed to
  DeepSpeed-launched processes (same batch-check failure). `use_cpu=True` in the training
  arguments happens to work today, only because the Trainer does not pass it on to `Accelerator`.

`enable_cpu_distributed()` fixes this at that one place: when the stock detection returns "no
distributed backend" for a launched process, it answers what accelerate itself answers for
`cpu=True` launches: `MULTI_CPU` over gloo. Everything downstream is stock: accelerate then lets
DeepSpeed open its process group with `dist_backend="gloo"` (DeepSpeed's CPU accelerator), counts
the ranks, and switches to `DistributedType.DEEPSPEED`, so the real DeepSpeed engine (ZeRO-2/3,
offload, its checkpoint format) runs; without DeepSpeed, torch DDP runs over gloo. It is a no-op
when CUDA or any other accelerator is present. `parse_recipe` calls it, so every trainer gets it.

The final save (`treetune.trainers.common.save_final_model`) writes what vLLM and `from_pretrained`
load directly: the full weights, gathered from all ranks under ZeRO-3 (DeepSpeed's "16-bit"
consolidation keeps the training dtype: bf16 with the GPU configs, fp32 in the CPU runs), plus the
tokenizer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PATCH_MARK = "_treetune_cpu_distributed"


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another device accelerate would train on."""
    import torch

    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    from accelerate.utils import is_hpu_available, is_mlu_available, is_musa_available, is_npu_available

    return any(check() for check in (is_npu_available, is_mlu_available, is_musa_available, is_hpu_available))


def enable_cpu_distributed() -> bool:
    """Let `accelerate launch` run DDP or DeepSpeed over gloo on a CPU-only machine; True if it applied.

    Call it before the first `TrainingArguments` / `Accelerator` is built in each process (the
    recipe parser does). Idempotent; does nothing when an accelerator is present.
    """
    if has_accelerator():
        return False
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    # DeepSpeed would pick its CPU accelerator anyway; naming it skips the detection and its warning.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stock = PartialState._prepare_backend
    if getattr(stock, _PATCH_MARK, False):
        return True

    def prepare_backend(self, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None):
        chosen, kind = stock(self, cpu, sagemaker_dp, backend)
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
        if kind == DistributedType.NO and launched and not cpu:
            # What accelerate answers for cpu=True, minus the MPI guess: torchrun and DeepSpeed's
            # launcher set RANK / WORLD_SIZE / MASTER_ADDR, which is gloo's env:// rendezvous.
            return backend or "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    setattr(prepare_backend, _PATCH_MARK, True)
    PartialState._prepare_backend = prepare_backend
    return True


def distributed_summary(trainer) -> dict[str, Any]:
    """What actually ran: world size, accelerate's distributed type, backend, and the DeepSpeed engine if any."""
    import torch.distributed as dist

    state = trainer.accelerator.state
    summary: dict[str, Any] = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "num_processes": state.num_processes,
        "process_index": state.process_index,
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "device": str(state.device),
        "model_wrapper": type(trainer.model_wrapped).__name__,
    }
    engine = getattr(trainer, "deepspeed", None)
    if engine is not None:
        summary["zero_stage"] = engine.zero_optimization_stage()
        summary["deepspeed_accelerator"] = _deepspeed_accelerator_name()
        offload = engine.zero_offload_optimizer()
        device = getattr(offload, "device", "none")
        summary["offload_optimizer"] = str(getattr(device, "value", device))
        # The basic optimizer under ZeRO's wrapper (DeepSpeedCPUAdam when offloading).
        summary["optimizer"] = type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__
    ref = getattr(trainer, "ref_model", None)
    if ref is not None:
        summary["ref_model_wrapper"] = type(ref).__name__
        if hasattr(ref, "zero_optimization_stage"):
            summary["ref_zero_stage"] = ref.zero_optimization_stage()
    return summary


def _deepspeed_accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def local_parameter_share(module) -> float:
    """Share of a model's parameters this rank holds: about 1/world_size under ZeRO-3, else 1."""
    held = total = 0
    for p in module.parameters():
        if hasattr(p, "ds_numel"):  # a ZeRO-3 partitioned parameter: ds_tensor is this rank's slice
            held += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            held += p.numel()
            total += p.numel()
    return held / total if total else 0.0


def launch_command(config_file: str | Path, script: list[str], num_processes: int | None = None,
                   python_module: bool = False) -> list[str]:
    """`accelerate launch` argv for a config in configs/accelerate/, with this machine's overrides.

    On a CPU-only machine: mixed precision off (bf16 DeepSpeed on a CPU is neither needed nor what
    the recipe parser sets) and a free rendezvous port, so concurrent jobs do not collide.
    """
    import sys

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    if not has_accelerator():
        command += ["--mixed_precision", "no", "--main_process_port", "0"]
    if python_module:
        command.append("--module")
    return command + list(script)
