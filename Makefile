# Everything a fresh machine needs: `make run` (the main job) and `make test` create .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: run test bench docs docs-check install clean

run: $(VENV)/.installed
	$(PY) examples/train.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

# The docs site (site/), built strictly: a broken link or anchor fails it.
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict

# Re-run the commands of the docs' fast generated tables and fail if a quoted number drifted (minutes).
docs-check: $(VENV)/.installed
	$(PY) docs/tools/docs_check.py $(ARGS)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_exchange.py $(ARGS)

install: $(VENV)/.installed

# torch first, pinned: on the reference machine torch==2.13.0 is the CPU build on disk, and the
# project's looser `torch>=2.2` then installs nothing more (a bare `torch` would pull a CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH)"
	$(VENV)/bin/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) outputs multirun site .pytest_cache .hypothesis
