"""The shipped arith tiny policy: the same build on every machine, replaced by a local build only on
request or when the recipe no longer matches it."""

from __future__ import annotations

import json

from treetune.data.arith import policies, policy_key, tiny_policy


def test_shipped_policy_is_the_default_and_matches_the_recipe(monkeypatch):
    monkeypatch.delenv(policies.REBUILD_ENV, raising=False)
    path = tiny_policy()
    assert path == str(policies.SHIPPED)
    build = json.loads((policies.SHIPPED / "build.json").read_text())
    assert build["policy_key"] == policy_key()
    assert 0.3 <= build["greedy_accuracy_test_500"] <= 0.75
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (policies.SHIPPED / name).stat().st_size > 0


def test_a_changed_recipe_or_a_rebuild_request_leaves_the_shipped_policy(monkeypatch, tmp_path):
    monkeypatch.setattr(policies, "policy_key", lambda: "0123456789ab")
    assert policies.shipped_policy() is None
    monkeypatch.undo()
    monkeypatch.setenv(policies.REBUILD_ENV, "1")
    # a rebuild goes to the cache; here a finished build is planted so nothing trains
    target = policies.cache_root() / f"tiny-policy-{policy_key()}"
    if not (target / "config.json").exists():
        monkeypatch.setenv("TREETUNE_CACHE", str(tmp_path))
        target = tmp_path / f"tiny-policy-{policy_key()}"
        target.mkdir()
        (target / "config.json").write_text("{}")
    assert tiny_policy() == str(target)


def test_benchmarks_name_the_build_they_start_from(monkeypatch, tmp_path):
    monkeypatch.delenv(policies.REBUILD_ENV, raising=False)
    shipped = policies.policy_build()
    assert shipped["shipped"] and shipped["build"] == policy_key()
    assert shipped["greedy_accuracy_test_500"] == json.loads((policies.SHIPPED / "build.json").read_text())["greedy_accuracy_test_500"]
    local = tmp_path / f"tiny-policy-{policy_key()}"
    local.mkdir()
    assert policies.policy_build(local) == {"path": str(local), "shipped": False, "build": local.name}
