"""Parsing a recipe (YAML via --config, any field overridable on the command line) for a trainer."""

from __future__ import annotations

import sys

from treetune.trainers.distributed import enable_cpu_distributed


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_recipe(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """TRL's parser over `dataclass_types`, with CPU-friendly defaults.

    Recipes for real models ask for bf16, which transformers refuses on a machine without a GPU
    unless told to train on the CPU; there, bf16 is switched off unless the command line sets it.
    On such a machine `accelerate launch` with DDP or DeepSpeed configs runs over gloo
    (`treetune.trainers.distributed.enable_cpu_distributed`, a no-op with a GPU).
    """
    from trl import TrlParser


    enable_cpu_distributed()  # before the training arguments set up the distributed state

    argv = list(sys.argv[1:] if argv is None else argv)
    if not _cuda() and not any(a == "--bf16" or a.startswith("--bf16=") for a in argv):
        argv += ["--bf16", "false"]
    return TrlParser(dataclass_types).parse_args_and_config(argv)
