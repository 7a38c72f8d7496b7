VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install demo test lint format docs clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,docs]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) scripts/make_demo_checkpoint.py demo_ckpt
	$(VENV)/bin/paramscope table demo_ckpt

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check paramscope tests scripts
	$(VENV)/bin/ruff format --check paramscope tests scripts

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

format: install
	$(VENV)/bin/ruff format paramscope tests scripts

clean:
	rm -rf $(VENV) demo_ckpt site
