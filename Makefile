# wlshear: two commands on a fresh machine.
#   make demo   set up .venv and run the main job (train.py on the embedded parametric source)
#   make test   set up .venv and run the test suite (what .ci/run runs)
#
# On machines without an NVIDIA GPU the set-up installs the CPU build torch==$(TORCH_CPU_VERSION)
# before the package, so no CUDA build is pulled. With a GPU (nvidia-smi works), or when the
# venv already has a torch, the user's torch is left alone.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
EXTRAS ?= dev,wlenet,sweeps
STAMP := $(VENV)/.wlshear-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed in $(VENV): leaving it alone"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing the default (CUDA) torch from the package index"; \
	else \
		echo "no GPU: installing CPU torch==$(TORCH_CPU_VERSION)"; \
		$(PY) -m pip install --quiet "torch==$(TORCH_CPU_VERSION)"; \
	fi
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: setup
	$(PY) train.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/render.py

clean:
	rm -rf $(VENV) outputs multirun data_cache .pytest_cache
