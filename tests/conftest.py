"""Shared fixtures: the real data in ../shared/data, and the tiny policy."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"the real test data is missing: expected it at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_policy_path() -> str:
    from treetune.data.arith import tiny_policy

    return tiny_policy()


@pytest.fixture(scope="session")
def engine(tiny_policy_path):
    """The tiny policy in vLLM, one for the whole session (an engine start is tens of seconds on a
    CPU). Modules that change its weights override it with their own, as test_treepo_rl does."""
    from treetune.rollouts.engines import VLLMEngine

    with VLLMEngine(tiny_policy_path, kv_cache_gb=0.25) as engine:
        yield engine


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real-model ground: SmolLM2-135M-Instruct as a safetensors checkpoint, converted once."""
    from treetune.data.pretrained import smollm2

    return smollm2()


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path):
    """SmolLM2 in vLLM, built as every job builds its engine, shared by the real-model test files
    (an engine start is tens of seconds on a CPU)."""
    from treetune.rollouts.run import EngineArgs, make_engine

    engine = make_engine(EngineArgs(model_name_or_path=smollm2_path, kv_cache_gb=0.5))
    yield engine
    engine.close()
