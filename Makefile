# Two commands do all set-up:  `make demo` (train on generated data) and `make test`.
# Each creates .venv with the project and its test tools on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint notebooks clean

$(BIN)/vision-tl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,lite]"
	touch $@

demo: $(BIN)/vision-tl
	$(BIN)/vision-tl demo

test: $(BIN)/vision-tl
	$(BIN)/pytest -q tests

lint: $(BIN)/vision-tl
	$(BIN)/ruff check vision_tl tests benchmarks notebooks

# Run the notebooks at their defaults and store the outputs GitHub shows (about two minutes).
notebooks: $(BIN)/vision-tl
	$(BIN)/python notebooks/refresh_outputs.py

clean:
	rm -rf $(VENV) runs data/demo data/demo-*px-seed*
