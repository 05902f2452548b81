# The two commands: `make train` and `make test`. Each does all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup train test dataset browser wrk bench clean

# The venv is byte-compiled after install: this machine (CI runs on one like it) sets
# PYTHONDONTWRITEBYTECODE=1, so nothing compiled on first import is kept, and every Python process
# the tests start (training runs, torchrun workers, servers) would compile torch again. Measured on
# a fresh clone: the suite's pytest took 146 s without compiled files and 111 s with them.
# compileall on all cores (-j 0) took 11 s here against ~22 s for pip's own serial compile. It
# reports as failures the few files in packages that are not Python 3.11 (torch's py312 test
# helpers), which pip's compile skips too: hence `|| true`.
# constraints.txt pins torch to the CPU build on this project's machines' disk: without it,
# pip resolves the package's torch range to a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
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

# Photos are data kept outside the tree: the tests read the local copy in ../shared/photos where
# there is one (else $FMNIST_PHOTOS or the cache; without any, the photo tests skip and say how to
# fetch them).
SHARED_PHOTOS := $(abspath ../shared/photos)
ifneq ($(wildcard $(SHARED_PHOTOS)),)
export FMNIST_PHOTOS ?= $(SHARED_PHOTOS)
endif

# FMNIST_REQUIRE_BROWSER: the browser test fails instead of skipping if chromium is missing.
# -n 2: two pytest-xdist workers (DEVELOPERS.md, Tests).
test: setup browser wrk
	FMNIST_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -n 2 --durations=15

bench: setup wrk
	$(BIN)/fmnist bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
