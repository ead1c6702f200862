# Two commands: `make demo` and `make test`. Both create the environment on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Keep DeepSpeed's JIT builds and hub caches inside the repo's ignored cache.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env demo test test-lowest lint format bench clean system

env: $(STAMP)

# torch is pinned to the CPU wheel here first, so the open range in pyproject.toml is
# already satisfied and pip never fetches a multi-GB CUDA build on a CPU-only machine.
# On a GPU machine, install the CUDA torch you want before `pip install -e .`.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pickalign demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The report's and the arena's browser tests drive Debian's Chromium through ChromeDriver, and the
# arena's load test starts a PostgreSQL server: installed as root when missing. Under `make test`
# those tests fail rather than skip without them.
system:
	@(command -v chromium && command -v chromedriver && ls /usr/lib/postgresql/*/bin/initdb) \
		>/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium chromium-driver postgresql)

test: lint system
	PICKALIGN_REQUIRE_SYSTEM=1 $(BIN)/python -m pytest

# The same suite on the lowest releases pyproject.toml admits, in their own environment (torch
# stays the local CPU wheel: no CPU build of its lowest release is at hand here).
LOWEST_VENV := .cache/venv-lowest
LOWEST := "transformers==4.57.*" "diffusers==0.35.*" "peft==0.17.*" "trl==0.24.*" \
	"accelerate==1.10.*" "deepspeed==0.17.*" "datasets==4.0.*" "bitsandbytes==0.46.*"
test-lowest: system
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(LOWEST_VENV)/bin/python -m pip install -q -e ".[dev]" $(LOWEST)
	PICKALIGN_REQUIRE_SYSTEM=1 TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions_lowest \
		$(LOWEST_VENV)/bin/python -m pytest -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python bench/reward_throughput.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
