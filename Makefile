# The two commands of the README, on a fresh clone:
#   make demo   sets up a virtual environment in .venv and runs the demo (Ctrl-C stops it)
#   make test   sets up the same environment, installs mosquitto and chromium if missing, and runs the whole suite
# Options: make demo DEMO_ARGS="--duration 30"   make test PYTEST_ARGS="-k buffer -x"

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench bundle clean

$(VENV)/.ready: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edge-agent needs Python 3.11 or newer; run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

demo: $(VENV)/.ready
	$(BIN)/edge-agent demo $(DEMO_ARGS)

test: $(VENV)/.ready
	@sh deploy/ensure-mosquitto.sh
	@sh deploy/ensure-chromium.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.ready
	$(BIN)/ruff check .

bench: $(VENV)/.ready
	@sh deploy/ensure-mosquitto.sh
	$(BIN)/python -m bench.e2e $(BENCH_ARGS)

# Every benchmark, then the generated summary in docs/benchmarks.md (about 15 minutes; a quiet machine gives
# figures worth keeping), e.g. make bench-all BENCH_ALL_ARGS="--quick"   (or "--hour" for the one-hour soak)
.PHONY: bench-all
bench-all: $(VENV)/.ready
	@sh deploy/ensure-mosquitto.sh
	$(BIN)/python -m bench.all $(BENCH_ALL_ARGS)

# The offline install bundle for a gateway (docs/install.md), e.g. make bundle BUNDLE_ARGS="--arch aarch64 --glibc 2.31"
bundle: $(VENV)/.ready
	$(BIN)/python deploy/build-bundle $(BUNDLE_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
