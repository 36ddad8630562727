"""The arith tiny policy taught both BVPO modes (with steps, and answer-only), built and cached.

BVPO mixes a DPO estimator on responses generated with the reasoning trace and one on responses
generated with the trace disabled (an empty think block after the prompt). The tiny arith policy
only knows the first mode, so this continues its SFT (`configs/arith/dual_mode_policy.yaml`) on one
record of each mode per problem:
- trace: "question\\n" -> the gold steps and "The answer is \\boxed{N}" (the tiny policy's own format,
  so the exact step checker still reads its solutions);
- empty: "question\\n" + EMPTY_THINK -> "The answer is \\boxed{N}" (answer only).
The build runs in a child process with a file lock and an atomic rename, like `tiny_policy()`; the
cache key covers the base policy, the recipe and the record format.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

RECIPE = "arith/dual_mode_policy.yaml"
RECORDS_VERSION = 1  # bump when dual_mode_records changes


def recipe_path() -> Path:
    return Path(str(resources.files("treetune.configs").joinpath(RECIPE)))


def dual_mode_records(problems: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion records, one trace and one answer-only record per arith train problem."""
    from treetune.data import PromptTemplate, load_problems
    from treetune.data.bvpo_pairs import mode_prompt

    template = PromptTemplate(style="bare")
    records = []
    for p in load_problems("arith", "train", limit=problems, seed=seed):
        records.append({"prompt": mode_prompt(p.question, "trace", template), "completion": p.solution})
        records.append({"prompt": mode_prompt(p.question, "empty", template),
                        "completion": f"The answer is \\boxed{{{p.answer}}}"})
    return records


def dual_mode_policy(cache_dir: str | Path | None = None, quiet: bool = False) -> str:
    """Path of the dual-mode tiny policy (a Qwen2 model vLLM loads), built on first call and cached."""
    import yaml

    from .tiny_policy import build_cached, cache_root, tiny_policy

    base = tiny_policy(cache_dir, quiet=quiet)
    root = Path(cache_dir) if cache_dir else cache_root()
    text = recipe_path().read_text()
    key = hashlib.sha256(f"{Path(base).name}\n{RECORDS_VERSION}\n{text}".encode()).hexdigest()[:12]

    def sft_args(staging: Path) -> list[str]:
        recipe = yaml.safe_load(text)
        problems = int(recipe.pop("dual_mode_problems"))
        records = staging / "dual_mode_records.jsonl"
        records.write_text("".join(json.dumps(r) + "\n" for r in dual_mode_records(problems)))
        recipe.update(model_name_or_path=base, dataset_path=str(records), output_dir=str(staging))
        resolved = staging / "dual_mode_recipe.yaml"
        resolved.write_text(yaml.safe_dump(recipe))
        return ["--config", str(resolved)]

    return build_cached(root / f"dual-mode-policy-{key}", "dual-mode arith policy", sft_args, quiet)
