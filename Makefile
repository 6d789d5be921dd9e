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

.PHONY: demo test bench venv clean fuse chromium package

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
