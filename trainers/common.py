"""What every job and trainer shares: parsing a recipe (YAML via --config, any field overridable on
the command line, old field names accepted with a warning for one release)."""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from collections.abc import Mapping

from treetune.trainers.distributed import enable_cpu_distributed

log = logging.getLogger(__name__)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def rename_deprecated(argv: list[str], renamed: Mapping[str, str]) -> list[str]:
    """`argv` with old field names (`renamed`: old -> new) replaced, on the command line and in the
    `--config` YAML (rewritten to a temporary copy); each old name found warns once."""
    if not renamed:
        return argv
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name.startswith("--") and name[2:] in renamed:
            new = renamed[name[2:]]
            warnings.warn(f"--{name[2:]} is deprecated and will be removed in the next release; use --{new}",
                          FutureWarning, stacklevel=3)
            arg = f"--{new}{eq}{value}"
        out.append(arg)
    for i, arg in enumerate(out):
        path = out[i + 1] if arg == "--config" and i + 1 < len(out) else arg.partition("=")[2] if arg.startswith("--config=") else None
        if not path:
            continue
        import yaml

        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
        old = [k for k in recipe if k in renamed]
        if not old:
            continue
        for k in old:
            warnings.warn(f"{path}: field {k!r} is deprecated and will be removed in the next release; use "
                          f"{renamed[k]!r}", FutureWarning, stacklevel=3)
            recipe[renamed[k]] = recipe.pop(k)
        copy = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="recipe-", delete=False)
        yaml.safe_dump(recipe, copy)
        copy.close()
        if arg == "--config":
            out[i + 1] = copy.name
        else:
            out[i] = f"--config={copy.name}"
    return out


def parse_config(dataclass_types: tuple, argv: list[str] | None = None,
                 renamed: Mapping[str, str] | None = None) -> tuple:
    """TRL's parser over `dataclass_types` (a job's recipe), old field names renamed with a warning."""
    from trl import TrlParser

    argv = rename_deprecated(list(sys.argv[1:] if argv is None else argv), renamed or {})
    return TrlParser(dataclass_types).parse_args_and_config(argv)


def parse_recipe(dataclass_types: tuple, argv: list[str] | None = None,
                 renamed: Mapping[str, str] | None = None) -> tuple:
    """A trainer's recipe: `parse_config` with CPU-friendly defaults.

    Recipes for real models ask for bf16, which transformers refuses on a machine without a GPU
    unless told to train on the CPU; there, bf16 is switched off unless the command line sets it.
    On such a machine `accelerate launch` with DDP or DeepSpeed configs runs over gloo
    (`treetune.trainers.distributed.enable_cpu_distributed`, a no-op with a GPU).
    """
    enable_cpu_distributed()  # before the training arguments set up the distributed state

    argv = list(sys.argv[1:] if argv is None else argv)
    if not _cuda() and not any(a == "--bf16" or a.startswith("--bf16=") for a in argv):
        argv += ["--bf16", "false"]
    return parse_config(dataclass_types, argv, renamed)
