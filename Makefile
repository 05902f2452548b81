# The two commands: `make train` and `make test`. Each does all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup train test test-deps dataset browser wrk bench clean

# Bytecode: this machine (CI runs on one like it) sets PYTHONDONTWRITEBYTECODE=1, so nothing
# compiled on first import would be kept, and every Python process the tests start (training runs,
# torchrun workers, servers) would compile torch again. make lets Python write its .pyc files, so the
# first process compiles the modules it imports and the rest reuse them; compiling the whole venv
# up front (compileall) took 11-36 s here and compiled thousands of torch files nothing imports.
unexport PYTHONDONTWRITEBYTECODE
# The venv's packages are installed by uv (from PyPI, into the venv): it downloads and unpacks
# in parallel, 12 s here where pip took 28 s, which is most of what `make test` spends before
# the first test. constraints.txt pins torch to the CPU build on this project's machines' disk
# (pip's find-links, read below, since uv does not read pip's settings): without it, the
# package's torch range resolves to a multi-GB CUDA build. The venv is made without pip and
# the system's pip puts uv in it (pip >= 22.3: --python), 0.1 s where venv's own pip set-up took
# 3.8 s here; uv then installs pip with the project, so the venv has pip like any other.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(BIN)/python install --quiet uv \
		|| { $(BIN)/python -m ensurepip --default-pip && $(BIN)/python -m pip install --quiet uv; }
	$(BIN)/uv pip install --python $(BIN)/python --quiet $(foreach d,$(FIND_LINKS),--find-links $(d)) \
		-c constraints.txt -e '.[dev]' pip
	touch $(STAMP)

# Debian packages, in one apt call per target (each call reads the package lists again):
# dataset-fashion-mnist for training (elsewhere fmnist downloads the files into ~/.cache/fmnist on
# first use); for the tests also chromium (the Playwright browser test; Playwright's own download
# cannot work here) and wrk (the load generator `fmnist bench serve` drives the server with;
# without it the bench uses a slower Python client and the wrk test skips).
dataset:
	@sh scripts/install-system-deps.sh dataset-fashion-mnist

test-deps:
	@sh scripts/install-system-deps.sh dataset-fashion-mnist chromium wrk

browser:
	@sh scripts/install-system-deps.sh chromium

wrk:
	@sh scripts/install-system-deps.sh wrk

setup: $(STAMP) dataset

train:
	@$(MAKE) --no-print-directory -j2 setup
	$(BIN)/fmnist train

# Photos are data kept outside the tree: the tests read the local copy in ../shared/photos where
# there is one (else $FMNIST_PHOTOS or the cache; without any, the photo tests skip and say how to
# fetch them).
SHARED_PHOTOS := $(abspath ../shared/photos)
ifneq ($(wildcard $(SHARED_PHOTOS)),)
export FMNIST_PHOTOS ?= $(SHARED_PHOTOS)
endif

# FMNIST_REQUIRE_BROWSER: the browser test fails instead of skipping if chromium is missing.
# -n 3: three pytest-xdist workers on this project's 2 cores (DEVELOPERS.md, Tests): a test that waits on
# a server's timeout or a socket leaves its core to another; 171 s against 184 s with two. --dist loadfile keeps each test file on one worker,
# so a module's fixtures (servers, exported models, an ensemble) are built once, not once per worker;
# --no-loadscope-reorder hands out files heaviest first (tests/conftest.py, HEAVY_FIRST).
# The venv (uv) and the Debian packages (apt) are set up side by side (-j2): neither needs the other.
test:
	@$(MAKE) --no-print-directory -j2 $(STAMP) test-deps
	FMNIST_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -n 3 --dist loadfile --no-loadscope-reorder --durations=15

bench: setup wrk
	$(BIN)/fmnist bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
