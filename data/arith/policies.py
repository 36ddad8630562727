"""Building and caching the arith policies: the tiny policy (`configs/sft/arith.yaml` run through
the SFT recipe) and the dual-mode policy BVPO needs (`configs/sft/arith_dual_mode.yaml`).

The build runs in a child process (`python -m treetune.trainers.sft.trainer`), so a caller inside a
distributed job or a test session keeps its own torch and accelerate state, and the child sees no
distributed environment. A file lock makes concurrent callers wait for one build; the result is
written to a temporary folder and renamed into place only when complete, so a killed build is
never mistaken for a finished one. The cache key is the recipe's fields and the arith generator's
version: change either and a new policy is built.

The tiny policy itself ships with treetune (`tiny_policy/`, 3.3 MB, with the key of the recipe it
was built from and its measured accuracy in `build.json`), so every machine starts from the same
policy; `tiny_policy(rebuild=True)` builds one here instead, and `ship()` replaces the shipped one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


SHIPPED = Path(__file__).resolve().parent / "tiny_policy"  # the build treetune ships (package data)
REBUILD_ENV = "TREETUNE_REBUILD_TINY_POLICY"


def shipped_policy() -> Path | None:
    """The tiny policy shipped with treetune, if it was built from the current recipe."""
    info = SHIPPED / "build.json"
    if not info.exists():
        return None
    built = json.loads(info.read_text())
    if built.get("policy_key") != policy_key():
        print(f"[treetune] the shipped tiny policy was built from another recipe ({built.get('policy_key')}, "
              f"now {policy_key()}); building one here", file=sys.stderr)
        return None
    return SHIPPED


def tiny_policy(cache_dir: str | Path | None = None, quiet: bool = False, rebuild: bool | None = None) -> str:
    """Path of the tiny arith policy.

    By default the build shipped with treetune, so every machine starts from the same policy and
    every figure measured on it reproduces (a build's stopping point moves with the machine: earlier
    builds started at 47.8% to 63.0% greedy). With `rebuild` (or TREETUNE_REBUILD_TINY_POLICY=1), or
    when the recipe no longer matches the shipped build, it is built here on first call (about 5
    minutes on 2 CPU cores) and cached.
    """
    if rebuild is None:
        rebuild = os.environ.get(REBUILD_ENV, "") not in ("", "0", "false")
    if not rebuild and cache_dir is None and (shipped := shipped_policy()) is not None:
        return str(shipped)
    root = Path(cache_dir) if cache_dir else cache_root()
    target = root / f"tiny-policy-{policy_key()}"
    return build_cached(target, "arith tiny policy",
                        lambda staging: ["--config", str(recipe_path()), "--output_dir", str(staging)], quiet)


def policy_build(path: str | Path | None = None) -> dict:
    """Which build of a tiny policy `path` is (default: the one `tiny_policy()` returns), so a
    benchmark names the start it measured from: the shipped build's recipe key and its measured
    greedy accuracy, or the cache folder (named by its recipe key) of a build made on this machine."""
    path = Path(path or tiny_policy(quiet=True))
    info = path / "build.json"
    if not info.exists():
        return {"path": str(path), "shipped": False, "build": path.name}
    built = json.loads(info.read_text())
    return {"path": str(path), "shipped": path.resolve() == SHIPPED.resolve(), "build": built.get("policy_key"),
            "greedy_accuracy_test_500": built.get("greedy_accuracy_test_500")}


SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja")


def ship(built: str | Path, measured: dict) -> Path:
    """Copy a local build into the package as the shipped tiny policy, with its recipe key and what
    was measured on it (`measured`: e.g. greedy accuracy on the test problems)."""
    built = Path(built)
    SHIPPED.mkdir(exist_ok=True)
    for name in SHIPPED_FILES:
        if (built / name).exists():
            shutil.copyfile(built / name, SHIPPED / name)
    train = next((json.loads((built / f).read_text()) for f in ("metrics.json", "train_metrics.json")
                  if (built / f).exists()), {})
    info = {"policy_key": policy_key(), "generator_version": GENERATOR_VERSION, "recipe": RECIPE,
            "steps": train.get("steps"), "held_out_accuracy": train.get("held_out_accuracy"),
            "num_parameters": train.get("num_parameters"), **measured}
    (SHIPPED / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return SHIPPED


def dual_mode_records(problems: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion records of the dual-mode policy, one of each BVPO mode per arith train problem.

    BVPO mixes a DPO estimator on responses generated with the reasoning trace and one on responses
    generated with the trace disabled (an empty think block after the prompt). The tiny policy only
    knows the first mode, so the dual-mode policy continues its SFT (`configs/sft/arith_dual_mode.yaml`)
    on these records:
    - trace: "question\\n" -> the gold steps and "The answer is \\boxed{N}" (the tiny policy's own
      format, so the exact step checker still reads its solutions);
    - empty: "question\\n" + EMPTY_THINK -> "The answer is \\boxed{N}" (answer only).
    """
    template = PromptTemplate(style="bare")
    records = []
    for p in arith_problems("train", limit=problems, seed=seed):
        records.append({"prompt": mode_prompt(p.question, "trace", template), "completion": p.solution})
        records.append({"prompt": mode_prompt(p.question, "empty", template),
                        "completion": f"The answer is \\boxed{{{p.answer}}}"})
    return records


def dual_mode_policy(cache_dir: str | Path | None = None, quiet: bool = False) -> str:
    """Path of the dual-mode tiny policy (a Qwen2 model vLLM loads), built on first call and cached;
    the cache key covers the base policy, the recipe and the record format."""
    import yaml

    base = tiny_policy(cache_dir, quiet=quiet)
    root = Path(cache_dir) if cache_dir else cache_root()
    text = recipe_path(DUAL_MODE_RECIPE).read_text()
    # the shipped base and the cached one it was copied from are the same model; a rebuilt base is not
    base_id = f"tiny-policy-{policy_key()}" + ("" if Path(base) == SHIPPED else "-rebuilt")
    key = hashlib.sha256(f"{base_id}\n{RECORDS_VERSION}\n{recipe_digest(text)}".encode()).hexdigest()[:12]

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
