# Two commands: `make demo` (venv + whole pipeline on the embedded digits data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml

.PHONY: demo test venv bench clean-demo

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/run_all.py -c $(CONFIG)
	$(PY) pipelines/baseline.py -c $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) pipelines/bench.py pipeline -c configs/cifar_gpu.yaml

clean-demo:
	rm -rf runs/demo input/digits input/digits_truth.csv submissions/demo__*
