# The two commands of the README. Both create the environment in .venv on first use (and reuse it
# afterwards: scripts/setup_env.sh reinstalls only when pyproject.toml changes).
PY := .venv/bin/python

.PHONY: main test test-fast env

env:
	@bash scripts/setup_env.sh

# The main job on the embedded default (the arith proving ground).
main: env
	$(PY) launch/main.py --config configs/main/arith.yaml $(ARGS)

# The test suite (what CI runs).
test: env
	$(PY) -m pytest tests $(ARGS)

# The developer loop: every test except those marked slow (they start vLLM, train a model or launch
# a job's processes), in a few minutes. `make test` still runs them all.
test-fast: env
	$(PY) -m pytest tests -m "not slow" $(ARGS)
