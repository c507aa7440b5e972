# Two commands do all the setup on a fresh Debian machine with Python 3.11:
#   make demo   - the main job on the shared datasets
#   make test   - the test suite (what CI runs)
# Both create and fill .venv first; re-running is fast when it is up to date.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
APT_PKGS    := pkg-config libturbojpeg0-dev libopencv-dev
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CQKD_DATA   ?= $(abspath ../shared/datasets)
PYTEST_ARGS ?=
DEMO_ARGS   ?=

export CQKD_DATA

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# FFCV compiles against libturbojpeg and OpenCV found through pkg-config.
$(VENV)/.apt:
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
		echo "installing Debian packages: $(APT_PKGS)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PKGS); \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): setup.cfg pyproject.toml $(VENV)/.apt
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

# The main job: convert -> teacher -> calibrate -> cache -> students -> report
# (CPU scale; `make demo DEMO_ARGS=--full` runs the real-scale recipe on a GPU).
demo: $(STAMP)
	$(PY) -m benchmarks.demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Throughput next to calibration, compared with the committed baseline.
bench: $(STAMP)
	$(PY) -m benchmarks run --quick --out runs/bench.json
	$(PY) -m benchmarks compare benchmarks/baseline_cpu.json runs/bench.json --threshold 5%

clean:
	rm -rf $(VENV) *.egg-info build
