# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv when it is
# missing and installs what it needs (torch is the CPU build pip finds on this machine).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.fastsd-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test test-real gpu-check bench venv clean fuse chromium package

venv: $(STAMP)

$(STAMP): setup.py requirements-colab.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-colab.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	FASTSD_HOME=$${FASTSD_HOME:-$(CURDIR)/demo_home} $(VENV)/bin/fastsd demo

test: $(STAMP) fuse chromium
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests

# The real-size tier (tests/real): random full-size SD 1.5, SD 2.1 and SDXL built once
# from their configs into $$FASTSD_FULL_CACHE (default ~/.cache/fastsd-full), run on the
# CPU. Slow (about 25 minutes) and about 12 GB of RAM; `make test` never runs it.
test-real: $(STAMP) fuse
	FASTSD_TEST_REAL=1 $(PY) -m pytest -q -p no:cacheprovider --durations=0 tests/real

# On a CUDA machine: it/s and peak VRAM at real size, written to benchmarks/RESULTS.md.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# Debian packages the tests use: fuse3 for the Drive stand-in (tests/colab, a FUSE
# passthrough), chromium for the browser tests (never a downloaded browser).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
fuse:
	@command -v fusermount3 >/dev/null && /sbin/ldconfig -p | grep -q libfuse3.so.3 || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $(SUDO) apt-get install -y -qq fuse3 libfuse3-3; }

chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

bench: $(STAMP)
	$(PY) benchmarks/run.py

# The sdist, then the wheel built from that sdist (not from the tree), into dist/.
package: $(STAMP)
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) demo_home .pytest_cache dist
