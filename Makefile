# Two commands do all the set-up on a fresh clone:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/diffalign demo

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check diffalign tests scripts

bench: install
	$(PY) scripts/bench_dpo.py
