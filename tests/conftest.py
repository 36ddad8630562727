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
