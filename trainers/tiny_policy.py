"""Building and caching the arith tiny policy: `configs/arith/policy.yaml` run through the SFT recipe.

The build runs in a child process (`python -m treetune.trainers.sft`), so a caller inside a
distributed job or a test session keeps its own torch and accelerate state, and the child sees no
distributed environment. A file lock makes concurrent callers wait for one build; the result is
written to a temporary folder and renamed into place only when complete, so a killed build is
never mistaken for a finished one. The cache key is the recipe's text and the arith generator's
version: change either and a new policy is built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

RECIPE = "arith/policy.yaml"
_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def cache_root() -> Path:
    """Where built artefacts are cached: $TREETUNE_CACHE, else ~/.cache/treetune."""
    return Path(os.environ.get("TREETUNE_CACHE") or Path.home() / ".cache" / "treetune")


def recipe_path() -> Path:
    return Path(str(resources.files("treetune.configs").joinpath(RECIPE)))


def policy_key() -> str:
    from treetune.data.arith import GENERATOR_VERSION

    text = recipe_path().read_text()
    return hashlib.sha256(f"{GENERATOR_VERSION}\n{text}".encode()).hexdigest()[:12]


def build_cached(target: Path, what: str, sft_args: Callable[[Path], list[str]], quiet: bool = False) -> str:
    """Build `target` once with the SFT recipe in a child process and return its path.

    `sft_args(staging)` prepares the staging folder (records, resolved recipe) and returns the
    arguments for `python -m treetune.trainers.sft`, which must write the model into `staging`.
    Concurrent callers wait on a file lock; the staging folder is renamed into place only when the
    build succeeded, so a killed build is never taken for a finished one.
    """
    from filelock import FileLock

    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return str(target)
        staging = target.parent / f".{target.name}.building"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        command = [sys.executable, "-m", "treetune.trainers.sft", *sft_args(staging)]
        if quiet:
            command += ["--disable_tqdm", "true"]
        # the child must not join the caller's distributed job (if any)
        env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV and not k.startswith("ACCELERATE_")}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        print(f"[treetune] building the {what} in {target} (once; a few minutes on a CPU)", file=sys.stderr)
        completed = subprocess.run(command, env=env, stdout=subprocess.DEVNULL if quiet else None)
        if completed.returncode != 0 or not (staging / "config.json").exists():
            raise RuntimeError(f"building the {what} failed (exit code {completed.returncode}); "
                               f"run the command by hand to see why: {' '.join(command)}")
        staging.rename(target)
    return str(target)


def tiny_policy(cache_dir: str | Path | None = None, quiet: bool = False) -> str:
    """Path of the tiny arith policy, built on first call (about 4 minutes on 2 CPU cores) and cached."""
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / f"tiny-policy-{policy_key()}"
    return build_cached(target, "arith tiny policy",
                        lambda staging: ["--config", str(recipe_path()), "--output_dir", str(staging)], quiet)
