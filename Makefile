# Two commands matter: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-long test-fast bench clean lock

setup: $(STAMP)

# Re-installs only when pyproject.toml, the lock file or the installer changed (uv, falling back to pip).
$(STAMP): pyproject.toml requirements.lock tools/install_venv.sh
	tools/install_venv.sh $(PYTHON) $(VENV)
	@touch $(STAMP)

demo: setup
	$(PY) -m jobs.demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The end-to-end scenarios kept out of `make test` for its budget (job submit, single-node driver kill, exact DDP resume...).
test-long: setup
	$(PY) -m pytest -m long $(PYTEST_ARGS)

# Unit tests only (no Ray cluster, no long training).
test-fast: setup
	$(PY) -m pytest -m "not slow and not chaos" $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks.run_all

# Regenerate requirements.lock from the current .venv (after changing a pin in pyproject.toml).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > requirements.lock

clean:
	rm -rf $(VENV) runs demo_data .pytest_cache
