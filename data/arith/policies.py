"""Building and caching the arith policies: the tiny policy (`configs/sft/arith.yaml` run through
the SFT recipe) and the dual-mode policy BVPO needs (`configs/sft/arith_dual_mode.yaml`).

The build runs in a child process (`python -m treetune.trainers.sft.trainer`), so a caller inside a
distributed job or a test session keeps its own torch and accelerate state, and the child sees no
distributed environment. A file lock makes concurrent callers wait for one build; the result is
written to a temporary folder and renamed into place only when complete, so a killed build is
never mistaken for a finished one. The cache key is the recipe's text and the arith generator's
version: change either and a new policy is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from treetune.data.arith.problems import GENERATOR_VERSION, arith_problems
from treetune.data.bvpo_pairs import mode_prompt
from treetune.data.cache import build_once, cache_root
from treetune.data.prompts import PromptTemplate

RECIPE = "sft/arith.yaml"
DUAL_MODE_RECIPE = "sft/arith_dual_mode.yaml"
RECORDS_VERSION = 1  # bump when dual_mode_records changes
_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def recipe_path(name: str = RECIPE) -> Path:
    return Path(str(resources.files("treetune.configs").joinpath(name)))


# The SFT recipe's problem fields took the shared names (treetune.data.ProblemArgs); the cache key
# was first computed over the names before, and is still, so policies built then stay valid.
KEY_NAMES = {"source": "dataset_source", "split": "dataset_split", "data_path": "dataset_path",
             "limit": "num_train_examples", "problem_seed": "data_seed_offset"}


def recipe_digest(text: str) -> str:
    """The recipe's fields, canonically written: comments and layout do not change a build, nor do
    the renamed problem fields (`KEY_NAMES`)."""
    import yaml

    recipe = yaml.safe_load(text) or {}
    return json.dumps({KEY_NAMES.get(k, k): v for k, v in recipe.items()}, sort_keys=True)


def policy_key() -> str:
    text = recipe_path().read_text()
    return hashlib.sha256(f"{GENERATOR_VERSION}\n{recipe_digest(text)}".encode()).hexdigest()[:12]


def build_cached(target: Path, what: str, sft_args: Callable[[Path], list[str]], quiet: bool = False) -> str:
    """Build `target` once with the SFT recipe in a child process and return its path.

    `sft_args(staging)` prepares the staging folder (records, resolved recipe) and returns the
    arguments for `python -m treetune.trainers.sft.trainer`, which must write the model into `staging`
    (see `treetune.data.cache.build_once` for the lock and the atomic rename).
    """

    def build(staging: Path) -> None:
        command = [sys.executable, "-m", "treetune.trainers.sft.trainer", *sft_args(staging)]
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

    return str(build_once(target, build))


def tiny_policy(cache_dir: str | Path | None = None, quiet: bool = False) -> str:
    """Path of the tiny arith policy, built on first call (about 4 minutes on 2 CPU cores) and cached."""
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / f"tiny-policy-{policy_key()}"
    return build_cached(target, "arith tiny policy",
                        lambda staging: ["--config", str(recipe_path()), "--output_dir", str(staging)], quiet)


def dual_mode_records(problems: int, seed: int = 0) -> list[dict[str, str]]:
    """The arith tiny policy taught both BVPO modes (with steps, and answer-only), built and cached.
    
    BVPO mixes a DPO estimator on responses generated with the reasoning trace and one on responses
    generated with the trace disabled (an empty think block after the prompt). The tiny arith policy
    only knows the first mode, so this continues its SFT (`configs/sft/arith_dual_mode.yaml`) on one
    record of each mode per problem:
    - trace: "question\\n" -> the gold steps and "The answer is \\boxed{N}" (the tiny policy's own format,
      so the exact step checker still reads its solutions);
    - empty: "question\\n" + EMPTY_THINK -> "The answer is \\boxed{N}" (answer only).
    The build runs in a child process with a file lock and an atomic rename, like `tiny_policy()`; the
    cache key covers the base policy, the recipe and the record format.

    Prompt/completion records, one trace and one answer-only record per arith train problem."""
    template = PromptTemplate(style="bare")
    records = []
    for p in arith_problems("train", limit=problems, seed=seed):
        records.append({"prompt": mode_prompt(p.question, "trace", template), "completion": p.solution})
        records.append({"prompt": mode_prompt(p.question, "empty", template),
                        "completion": f"The answer is \\boxed{{{p.answer}}}"})
    return records


def dual_mode_policy(cache_dir: str | Path | None = None, quiet: bool = False) -> str:
    """Path of the dual-mode tiny policy (a Qwen2 model vLLM loads), built on first call and cached."""
    import yaml

    base = tiny_policy(cache_dir, quiet=quiet)
    root = Path(cache_dir) if cache_dir else cache_root()
    text = recipe_path(DUAL_MODE_RECIPE).read_text()
    key = hashlib.sha256(f"{Path(base).name}\n{RECORDS_VERSION}\n{recipe_digest(text)}".encode()).hexdigest()[:12]

    def sft_args(staging: Path) -> list[str]:
        recipe = yaml.safe_load(text)
        problems = int(recipe.pop("dual_mode_problems"))
        records = staging / "dual_mode_records.jsonl"
        records.write_text("".join(json.dumps(r) + "\n" for r in dual_mode_records(problems)))
        recipe.update(model_name_or_path=base, data_path=str(records), output_dir=str(staging))
        resolved = staging / "dual_mode_recipe.yaml"
        resolved.write_text(yaml.safe_dump(recipe))
        return ["--config", str(resolved)]

    return build_cached(root / f"dual-mode-policy-{key}", "dual-mode arith policy", sft_args, quiet)
