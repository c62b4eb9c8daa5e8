# fused_ckpt developer commands. `make test` and `make demo` work on a fresh machine and inside
# an environment that already has torch:
#
# - python3 is an activated virtual environment or conda environment that already has torch and
#   triton (the usual CUDA setup): make uses that environment as it is. It installs the test
#   dependencies and fused_ckpt (editable, csrc compiled against that torch) into it; no .venv.
# - otherwise make creates (or reuses) .venv. If python3 itself imports torch and triton (a CUDA
#   box with torch preinstalled system-wide, maybe without network), .venv gets
#   --system-site-packages and keeps that torch/triton; else it installs the pinned CPU builds
#   torch==2.13.0 and triton==3.9.0.
# `make ACTIVE_ENV=` forces the .venv route; `make PYTHON=/path/to/python` picks the interpreter.

PYTHON ?= python3
VENV   ?= .venv
TORCH_PIN  ?= torch==2.13.0
TRITON_PIN ?= triton==3.9.0
TEST_DEPS  ?= numpy pytest ninja "transformers>=4.45" matplotlib peft
# setuptools/wheel: `pip install --no-build-isolation` uses the environment's own; an old one
# fails with "invalid command 'bdist_wheel'".
BUILD_DEPS ?= "setuptools>=64" wheel

# The prefix of the active environment python3 runs in, when it has torch and triton; else empty.
ACTIVE_ENV := $(shell $(PYTHON) -c "import importlib.util as u, os, sys; \
  env = sys.prefix != sys.base_prefix or os.environ.get('CONDA_PREFIX') == sys.prefix; \
  print(sys.prefix if env and u.find_spec('torch') and u.find_spec('triton') else '')" 2>/dev/null)

ifneq ($(strip $(ACTIVE_ENV)),)
PY    := $(shell $(PYTHON) -c "import sys; print(sys.executable)")
STAMP := build/make-stamps/installed$(subst /,_,$(ACTIVE_ENV))
else
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.fused_ckpt-installed
endif

.PHONY: venv install test test-fast demo bench gpu-check clean

$(STAMP): setup.py pyproject.toml Makefile $(wildcard csrc/*)
ifneq ($(strip $(ACTIVE_ENV)),)
	@echo "[make] using the active environment $(ACTIVE_ENV) (it has torch and triton)"
	$(PY) -m pip install -q $(BUILD_DEPS) $(TEST_DEPS) || echo "[make] warning: could not install build/test deps"
else
	@if $(PYTHON) -c "import torch, triton" >/dev/null 2>&1; then \
	  echo "[make] python3 already has torch+triton: venv with system site packages"; \
	  [ -x $(PY) ] || $(PYTHON) -m venv --system-site-packages $(VENV); \
	  $(PY) -m pip install -q $(BUILD_DEPS) $(TEST_DEPS) || echo "[make] warning: could not install build/test deps"; \
	else \
	  [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true; \
	  $(PY) -m pip install -q $(TORCH_PIN) $(TRITON_PIN) $(BUILD_DEPS) $(TEST_DEPS); \
	fi
	@$(PY) -c "import torch, triton" || { echo "[make] $(PY) cannot import torch and triton"; exit 1; }
endif
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q -e . --no-build-isolation
	@$(PY) -c "import fused_ckpt._C" || { echo "[make] the csrc extension fused_ckpt._C was not built"; exit 1; }
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

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
