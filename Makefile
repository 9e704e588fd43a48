# `make demo` and `make test` work on a fresh machine with only Python 3.11: they create .venv,
# install the project with its dev group, and run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip >= 25.1 understands [dependency-groups] (--group dev).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -qq --upgrade "pip>=25.1"
	$(BIN)/python -m pip install -qq --editable . --group dev
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pipeline demo --workspace demo-workspace

# The browser test drives Debian's Chromium; install it when missing and we can (root + apt),
# otherwise that test skips and says why.
test: $(STAMP)
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium for the browser test (apt)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
			>/dev/null 2>&1 || echo "chromium could not be installed: the browser test will skip"; \
	fi
	$(BIN)/python -m pytest
	@echo "numerics tests again as on an AVX2-only CPU (oneDNN limited to AVX2: float32, other kernels)"
	ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -m numerics

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/privacy.py
	$(BIN)/python bench/privacy.py --scale
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) demo-workspace .pytest_cache .ruff_cache .hypothesis
