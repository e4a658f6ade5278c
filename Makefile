# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (Python >= 3.10) and install what they need first.
PYTHON ?= python3
VENV   ?= .venv
# torch first, so pip keeps it; override for your machine, e.g. TORCH="torch==2.5.1 torchvision==0.20.1".
TORCH  ?= torch==2.14.1 torchvision==0.29.1
BIN    := $(VENV)/bin

.PHONY: demo test lint setup clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[standalone,dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m textual_inversion_ext demo --out demo-output

test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) demo-output
