# `make demo`: set everything up, train a baseline and an A-FAN small CNN on the built-in
# Shapes data, print the comparison and write runs/compare/base_vs_afan.png.
# `make test`: set everything up, run ruff and the test suite (`pytest -m "not slow"` is the
# quick tier for development, `pytest -m cuda` the GPU tests).
# TORCH pins the versions the project is tested with; override it for another platform,
# e.g. `make test TORCH="torch torchvision"`.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH) -r requirements.txt "pytest>=7" "pytest-timeout>=2" "ruff>=0.5"
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m Classification.compare

clean:
	rm -rf $(VENV) runs
