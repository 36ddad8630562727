"""The trainer scaffold: what every trainer (SFT, PRM, Step-DPO, MCTS-DPO, BVPO, Q-Tuning) shares.

- recipes: `parse_config` / `parse_recipe` read YAML via `--config` with TRL's parser, any field
  overridable on the command line, old field names accepted with a warning for one release;
- `setup_logging()`: INFO by default (`$TREETUNE_LOG` sets another level), third-party chatter off;
- policy loading: `load_policy(model_args)` reads TRL's `ModelConfig` (the arith tiny policy when it
  names no model), `peft_config(model_args)` its LoRA fields, the one LoRA vocabulary;
- `resume_point(output_dir, resume_from_checkpoint)`: `auto` is the newest complete checkpoint;
- `save_final_model(...)`: a plain checkpoint vLLM and `from_pretrained` load (LoRA merged, ZeRO-3
  weights gathered), tokenizer included;
- run files: `recipe.json` (the resolved recipe) and `metrics.json` in the output_dir. A trainer's
  output_dir is the model checkpoint, whose `config.json` is the model's own (vLLM and
  `from_pretrained` read it), so the recipe a job would write as `config.json` is `recipe.json` here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from treetune.data.arith import tiny_policy
from treetune.data.pretrained import whole_model_loading
from treetune.rollouts.engines.base import native_bf16
from treetune.trainers.distributed import enable_cpu_distributed

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"  # in a trainer's output_dir (a model folder, where config.json is the model's)
CONFIG_FILE = "config.json"  # in a folder that holds no model (the MCTS-DPO loop's top folder)
METRICS_FILE = "metrics.json"
LORA_RENAMED = {"use_lora": "use_peft"}  # the PRM trainer's and the distributed check's old LoRA switch

# Loggers that speak at INFO about things a training run's reader does not need (HTTP requests,
# file locks, dataset caching, the elastic launcher's bookkeeping); they still show warnings.
NOISY_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock", "fsspec", "datasets", "torch.distributed.elastic",
                 "numexpr", "matplotlib", "PIL", "asyncio", "DeepSpeed", "torch._dynamo", "torch._inductor")
# Warnings raised inside third-party code on every such run, about that code's own calls: nothing
# a treetune user can change. (category, message regex)
QUIET_WARNINGS = (
    # DeepSpeed's ZeRO collectives, under every distributed run
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),
    # the Trainer's dataloader on a machine without a GPU, where pinned memory is moot
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
)


def setup_logging(level: str | None = None) -> None:
    """Log treetune at `level` (default `$TREETUNE_LOG`, else INFO) with timestamps; third-party
    loggers that chatter at INFO keep only their warnings, and warnings that tell the user nothing
    are dropped. Safe to call more than once (each trainer's `main` does)."""
    name = (level or os.environ.get("TREETUNE_LOG") or "INFO").upper()
    value = logging.getLevelName(name)
    if not isinstance(value, int):
        raise ValueError(f"TREETUNE_LOG={name!r}: not a logging level (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(level=value, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(value)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(value, logging.WARNING))
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else a warning at every dataloader fork


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def rename_deprecated(argv: list[str], renamed: Mapping[str, str | Callable[[Any], tuple[str, Any]]]) -> list[str]:
    """`argv` with old field names (`renamed`: old -> new) replaced, on the command line and in the
    `--config` YAML (rewritten to a temporary copy); each old name found warns once. A rename that
    depends on the value maps the old name to a function of the value giving (new name, new value);
    those apply first, to the values as the user wrote them (`rename_by_value`)."""
    if not renamed:
        return argv
    argv = rename_by_value(argv, {k: v for k, v in renamed.items() if callable(v)})
    renamed = {k: v for k, v in renamed.items() if not callable(v)}
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


def rename_by_value(argv: list[str], renamed: Mapping[str, Callable[[Any], tuple[str, Any]]]) -> list[str]:
    """`argv` with each `--old value` (or `old: value` in the `--config` YAML) replaced by the
    (new name, new value) that `renamed[old](value)` gives; a warning wherever that changes anything."""
    if not renamed:
        return argv
    out, i = [], 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        old = name[2:] if name.startswith("--") else None
        if old not in renamed:
            out.append(argv[i])
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"--{old} needs a value")
            value, i = argv[i + 1], i + 1
        new, new_value = renamed[old](value)
        if (new, str(new_value)) != (old, value):
            warnings.warn(f"--{old} {value} is deprecated and will be removed in the next release; use "
                          f"--{new} {new_value}", FutureWarning, stacklevel=4)
        out += [f"--{new}", str(new_value)]
        i += 1
    for i, arg in enumerate(out):
        path = out[i + 1] if arg == "--config" and i + 1 < len(out) else arg.partition("=")[2] if arg.startswith("--config=") else None
        if not path:
            continue
        import yaml

        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
        changes = {k: renamed[k](recipe[k]) for k in recipe if k in renamed}
        changes = {k: nv for k, nv in changes.items() if nv != (k, recipe[k])}
        if not changes:
            continue
        for k, (new, new_value) in changes.items():
            warnings.warn(f"{path}: field {k!r}: {recipe[k]!r} is deprecated and will be removed in the next release; "
                          f"use {new!r}: {new_value!r}", FutureWarning, stacklevel=4)
            del recipe[k]
        recipe.update(dict(changes.values()))
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
    unless told to train on the CPU; there, bf16 is switched off unless the command line sets it,
    and where the CPU has no native bf16 (emulated: several times slower) so is a recipe's
    `dtype: bfloat16` for the weights: float32 unless the command line sets `--dtype`.
    On such a machine `accelerate launch` with DDP or DeepSpeed configs runs over gloo
    (`treetune.trainers.distributed.enable_cpu_distributed`, a no-op with a GPU).
    """
    enable_cpu_distributed()  # before the training arguments set up the distributed state

    argv = list(sys.argv[1:] if argv is None else argv)
    if not _cuda() and not any(a == "--bf16" or a.startswith("--bf16=") for a in argv):
        argv += ["--bf16", "false"]
    takes_dtype = any("dtype" in {f.name for f in dataclasses.fields(t)} for t in dataclass_types)
    if (takes_dtype and not _cuda() and not native_bf16()
            and not any(a == "--dtype" or a.startswith("--dtype=") for a in argv)):
        argv += ["--dtype", "float32"]
    return parse_config(dataclass_types, argv, renamed)


# ---------------------------------------------------------------------------- policy loading

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str, revision: str | None = None):
    """The tokenizer at `path`, with a pad token (the EOS token when it has none: batches need one).

    A local folder without tokenizer files is refused by name: transformers would otherwise build an
    empty one-token tokenizer from the model's config and training would go on on garbage."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the base model's tokenizer "
            f"into it (AutoTokenizer.from_pretrained(<base model>).save_pretrained({str(folder)!r})), or pass "
            "--model_name_or_path a checkpoint folder or hub name that has one")
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, model_args, model_class=None, **kwargs):
    """The model at `path` as TRL's `ModelConfig` asks (revision, dtype, attention, 4/8-bit); a causal
    LM unless `model_class` says otherwise. Build it after the training config, so that under
    ZeRO-3 the weights load already partitioned."""
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    options = dict(revision=model_args.model_revision, dtype=model_args.dtype or "auto",
                   attn_implementation=model_args.attn_implementation)
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        options["quantization_config"] = quantization
    options.update(kwargs)
    return (model_class or AutoModelForCausalLM).from_pretrained(path, **options)


def load_policy(model_args, path: str | None = None, default: Callable[[], str] = tiny_policy,
                model_class=None, **kwargs) -> tuple[str, Any, Any]:
    """(path, tokenizer, model) of the policy: `path`, else the one `model_args` names, else
    `default()` (the arith tiny policy, built on first use)."""
    path = path or model_args.model_name_or_path or default()
    return path, load_tokenizer(path, model_args.model_revision), load_model(path, model_args, model_class, **kwargs)


def peft_config(model_args, task_type: str | None = None):
    """LoRA from `ModelConfig` (`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`,
    `lora_target_modules`, ...), None without `use_peft`. `task_type` replaces the default
    CAUSAL_LM where a trainer's model is another kind (the PRM's token head: TOKEN_CLS)."""
    from trl import get_peft_config

    if task_type and model_args.lora_task_type == "CAUSAL_LM":
        model_args = dataclasses.replace(model_args, lora_task_type=task_type)
    return get_peft_config(model_args)


# ---------------------------------------------------------------------------- resuming

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
AUTO = ("auto", "true", "last")


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir` that were written whole, oldest first.

    The Trainer writes `trainer_state.json` last, so a folder without it is a save that was cut
    off (the run killed while writing it) and cannot be resumed from."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    complete = []
    for step, path in sorted(found):
        if (path / "trainer_state.json").is_file():
            complete.append(path)
        else:
            log.warning("%s has no trainer_state.json (a save that was cut off): not resumable, skipped", path)
    return complete


def resume_point(output_dir: str | Path, resume_from_checkpoint: str | bool | None) -> str | None:
    """What `Trainer.train(resume_from_checkpoint=...)` gets: a checkpoint folder, or None to start fresh.

    `auto` (also `true` / `last`) is the newest complete `checkpoint-*` in `output_dir`, or a fresh
    start when there is none, so the same command serves the first run and every restart; a path
    is taken as given (it must exist); empty or `false` starts fresh."""
    wanted = resume_from_checkpoint
    if wanted is None or wanted is False:
        return None
    text = str(wanted).strip()
    if text.lower() in ("", "false", "no", "none"):
        return None
    if wanted is True or text.lower() in AUTO:
        found = complete_checkpoints(output_dir)
        if found:
            log.info("resuming from %s", found[-1])
            return str(found[-1])
        log.info("resume_from_checkpoint %s: no checkpoint in %s yet, starting fresh", text, output_dir)
        return None
    if not (Path(text) / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume_from_checkpoint {text!r}: not a checkpoint folder (no trainer_state.json); "
                                "give a checkpoint-N folder, or 'auto' for the newest one in output_dir")
    return text


def resumed_step(checkpoint: str | None) -> int:
    """The optimizer step a run resumed at (0 for a fresh start)."""
    if not checkpoint:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step", 0))


# ---------------------------------------------------------------------------- final save

def save_final_model(trainer, output_dir: str | Path, tokenizer=None) -> Path:
    """Save full weights (+ tokenizer) that vLLM and `from_pretrained` load directly; call on every rank.

    Under ZeRO-3 the shards are gathered into one state dict (`stage3_gather_16bit_weights_on_model_save`);
    if a config left that off, the flag is switched on for this save, since otherwise transformers
    writes only a DeepSpeed checkpoint that needs `zero_to_fp32.py` before anything can load it.
    A LoRA model is saved as its adapter (in `adapter/`) and as the base with the adapter merged in.
    """
    from peft import PeftModel

    output_dir = Path(output_dir)
    lora = isinstance(trainer.accelerator.unwrap_model(trainer.model), PeftModel)
    engine = getattr(trainer, "deepspeed", None)
    forced = False
    if (engine is not None and engine.zero_optimization_stage() == 3
            and not engine.zero_gather_16bit_weights_on_model_save()):
        engine._config.zero_config.gather_16bit_weights_on_model_save = True
        forced = True
    try:
        # Collective under ZeRO-3 (every rank gathers); only the main process writes.
        trainer.save_model(str(output_dir / "adapter" if lora else output_dir))
    finally:
        if forced:
            engine._config.zero_config.gather_16bit_weights_on_model_save = False
    if trainer.accelerator.is_main_process:
        if lora:
            _merge_adapter(output_dir / "adapter", output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(output_dir))
        weights = list(output_dir.glob("*.safetensors")) + list(output_dir.glob("pytorch_model*.bin"))
        if not weights:
            raise RuntimeError(f"{output_dir}: no model weights were written")
    trainer.accelerator.wait_for_everyone()
    return output_dir


def train_and_save(trainer, output_dir: str | Path, tokenizer, resume_from_checkpoint: str | bool | None):
    """Every trainer's tail: resume where `resume_from_checkpoint` says (`auto`: the newest complete
    checkpoint in the Trainer's own output_dir, where it writes them), train, and save the final model
    into `output_dir` (vLLM-loadable: LoRA merged, ZeRO-3 weights gathered). Returns the Trainer's
    train result and the checkpoint it resumed from (None for a fresh start); call on every rank."""
    checkpoint = resume_point(trainer.args.output_dir, resume_from_checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_final_model(trainer, output_dir, tokenizer)
    return result, checkpoint


def _merge_adapter(adapter_dir: Path, output_dir: Path) -> None:
    """Base weights + saved adapter, merged on the CPU of the main process (no sharded state involved).

    Only the main process runs this, so transformers must not build the base under `zero.Init`
    (a collective that would wait forever for the other ranks); ZeRO-3's hook is lifted meanwhile.
    """
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForTokenClassification
    task = json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")
    loader = AutoPeftModelForTokenClassification if task == "TOKEN_CLS" else AutoPeftModelForCausalLM
    with whole_model_loading():
        merged = loader.from_pretrained(str(adapter_dir), dtype="auto").merge_and_unload()
    merged.save_pretrained(str(output_dir))


# ---------------------------------------------------------------------------- run files

def _write_json(path: Path, data: Any) -> None:
    """Whole or not at all: a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


SECRET_FIELDS = ("hub_token",)  # credentials never written to a run folder


def resolved_recipe(*parts) -> dict[str, Any]:
    """One flat mapping field -> value over a recipe's parsed dataclasses, as its YAML would be
    written, so `--config recipe.json` runs the same recipe again. TrainingArguments contribute
    their `to_dict()` (enums as values), which masks every `*_token` field with a placeholder that
    would be read back as a value: credentials are left out (None) instead, and `eos_token` /
    `pad_token`, vocabulary rather than secrets, keep their values."""
    recipe: dict[str, Any] = {}
    for part in parts:
        if not hasattr(part, "to_dict"):
            recipe.update(dataclasses.asdict(part))
            continue
        values = part.to_dict()
        for name, value in values.items():
            if name.endswith("_token"):
                values[name] = None if name in SECRET_FIELDS else getattr(part, name, None)
        recipe.update(values)
    return recipe


def write_recipe(output_dir: str | Path, *parts, name: str = RECIPE_FILE) -> dict[str, Any]:
    """Write the resolved recipe (`resolved_recipe(*parts)`) into output_dir before training starts,
    so a run that fails still says what it was; every rank may call it, rank 0 writes."""
    recipe = resolved_recipe(*parts)
    if int(os.environ.get("RANK", "0")) == 0:
        _write_json(Path(output_dir) / name, recipe)
    return recipe


def run_metrics(trainer, result, checkpoint: str | None) -> dict[str, Any]:
    """What every trainer's `metrics.json` starts with: the Trainer's own train metrics, the final
    step, the world size, where the run resumed from (`resumed_from`, `resumed_step`) and the
    logged training loss of every logging step."""
    return dict(result.metrics, steps=trainer.state.global_step, world_size=trainer.accelerator.num_processes,
                resumed_from=checkpoint, resumed_step=resumed_step(checkpoint),
                loss_history=[h["loss"] for h in trainer.state.log_history if "loss" in h])


def write_metrics(output_dir: str | Path, metrics: Mapping[str, Any], name: str = METRICS_FILE) -> Path:
    """Write `metrics.json` (or `name`) into output_dir; call it on the main process."""
    path = Path(output_dir) / name
    _write_json(path, dict(metrics))
    return path
