# Two commands: `make demo` (venv + whole pipeline on the embedded digits data) and `make test`.
# `make bench` measures every stage of BENCH_CONFIG; `make gpu` is the one command a lent GPU runs, on
# GPU_CONFIG (scripts/gpu_run.sh: no venv, the device's python3 + carried wheels; OUT must be set).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml
BENCH_CONFIG ?= configs/cifar_gpu.yaml
GPU_CONFIG ?= configs/cifar_gpu_pretrained.yaml

.PHONY: demo test venv bench gpu clean-demo

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

$(VENV)/.installed-test: requirements-test.txt $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt -c requirements.txt
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/run_all.py -c $(CONFIG)
	$(PY) pipelines/baseline.py -c $(CONFIG)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) pipelines/bench.py pipeline -c $(BENCH_CONFIG)

gpu:
	CONFIG=$(GPU_CONFIG) bash scripts/gpu_run.sh

clean-demo:
	rm -rf runs/demo input/digits input/digits_truth.csv submissions/demo__*
