# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# A venv (.venv) gets pinned dependencies, the extension is built in place with
# `pip install -e . --no-build-isolation`, and stamps make a second run reuse both.
#
# On a machine without CUDA the CPU wheel torch==2.13.0 is installed; where nvidia-smi finds a
# GPU the venv sees the system's (CUDA) torch and Triton instead, and the CUDA kernels are built.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

ifeq ($(HAS_GPU),1)
VENV_FLAGS := --system-site-packages
TORCH_PINS :=
else
VENV_FLAGS :=
TORCH_PINS := torch==2.13.0 triton==3.9.0
endif
TOOL_PINS := numpy ninja pybind11 pytest pytest-benchmark hypothesis matplotlib setuptools wheel \
	scikit-learn tqdm pillow nvidia-cutlass==4.2.0.0

SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: demo test mutants build clean

# The main jobs on the embedded defaults: the fused ops on ResNet-50's layer shapes against the
# float64 reference, a short training run on scikit-learn's digits (fused vs eager), a quick
# model benchmark. Tables print; plots and results go to runs/demo and benchmarks/results/.
demo: .stamp-build
	$(PY) -m resnet_fast verify --model resnet50
	$(PY) -m resnet_fast train --data digits --size 16 --compare-eager --out runs/demo
	$(PY) -m resnet_fast bench --quick

test: .stamp-build
	$(PY) -m pytest -q

# Mutation check (not part of `make test`): plausible bugs applied one at a time to a scratch
# copy of the working tree, each of which its focused tests must catch; C++ mutants rebuild
# the extension there. Writes benchmarks/results/mutants_cpu.json.
mutants: .stamp-build
	$(PY) benchmarks/mutants.py

build: .stamp-build

$(PY):
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

.stamp-deps: Makefile | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) $(TOOL_PINS)
	touch $@

.stamp-build: .stamp-deps $(SOURCES)
	$(PY) -m pip install -q -e . --no-build-isolation
	touch $@

clean:
	rm -rf build *.egg-info resnet_fast/*.so .stamp-build
