# The two commands: `make train` and `make test`. Each does all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup train test dataset browser wrk bench clean

# pip byte-compiles what it installs (no --no-compile): this machine (CI runs on one like it) sets
# PYTHONDONTWRITEBYTECODE=1, so nothing compiled on first import is kept, and every Python process
# the tests start (training runs, torchrun workers, servers) would compile torch again. Measured on
# a fresh clone: the suite's pytest took 146 s without compiled files and 109 s with them.
# constraints.txt pins torch to the CPU build on this project's machines' disk: without it,
# pip resolves the package's torch range to a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Debian's dataset-fashion-mnist package where apt and root are available; elsewhere
# fmnist downloads the files into ~/.cache/fmnist on first use.
dataset:
	@sh scripts/install-system-deps.sh dataset-fashion-mnist

# Debian's chromium for the Playwright browser test (Playwright's own download cannot work here).
browser:
	@sh scripts/install-system-deps.sh chromium

# Debian's wrk, the load generator `fmnist bench serve` drives the server with (without it the
# bench falls back to a slower Python client, and the wrk test skips).
wrk:
	@sh scripts/install-system-deps.sh wrk

setup: $(STAMP) dataset

train: setup
	$(BIN)/fmnist train

# FMNIST_REQUIRE_BROWSER: the browser test fails instead of skipping if chromium is missing.
# -n 2: two pytest-xdist workers (DEVELOPERS.md, Tests).
test: setup browser wrk
	FMNIST_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -n 2 --durations=15

bench: setup wrk
	$(BIN)/fmnist bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
