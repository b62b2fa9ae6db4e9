# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kiln-installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kiln run --config configs/tiny.yaml --storage ./artifacts

test: $(STAMP)
	$(VENV)/bin/pytest -q tests

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf artifacts bench/_work
