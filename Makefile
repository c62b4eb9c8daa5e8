# fused_ckpt developer commands. `make test` and `make demo` work on a fresh machine:
# they create (or reuse) .venv, install pinned torch/triton, build the csrc extension, then run.
#
# CPU machines: torch==2.13.0 (CPU wheel, local on the project machines) and triton==3.9.0.
# Machines whose python3 already imports torch (e.g. a CUDA box with torch preinstalled and no
# network) get a venv with --system-site-packages and keep that torch/triton.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN  ?= torch==2.13.0
TRITON_PIN ?= triton==3.9.0
TEST_DEPS  ?= numpy pytest ninja "transformers>=4.45" matplotlib
STAMP  := $(VENV)/.fused_ckpt-installed

.PHONY: venv install test test-fast demo bench gpu-check clean

$(STAMP): setup.py Makefile $(wildcard csrc/*)
	@if $(PYTHON) -c "import torch, triton" >/dev/null 2>&1; then \
	  echo "[make] python3 already has torch+triton: venv with system site packages"; \
	  [ -x $(PY) ] || $(PYTHON) -m venv --system-site-packages $(VENV); \
	  $(PY) -m pip install -q $(TEST_DEPS) || echo "[make] warning: could not install test deps"; \
	else \
	  [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true; \
	  $(PY) -m pip install -q $(TORCH_PIN) $(TRITON_PIN) $(TEST_DEPS); \
	fi
	MAX_JOBS=2 $(PY) -m pip install -q -e . --no-build-isolation
	@touch $(STAMP)

venv install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -x tests -m "not slow"

demo: $(STAMP)
	$(PY) -m fused_ckpt.demo

bench: $(STAMP)
	$(PY) -m fused_ckpt.bench

gpu-check:
	bash benchmarks/gpu_check.sh benchmarks/results/latest

clean:
	rm -rf build *.egg-info fused_ckpt/*.so
