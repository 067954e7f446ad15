# The two set-up commands of the README: `make demo` (install + main job) and `make test` (install + tests).
# Both are idempotent: the venv is rebuilt only when pyproject.toml or constraints.txt change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the local CPU wheel; every later install is pinned to it by constraints.txt.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/conan pipeline --config jobs/configs/pipeline_tiny.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=20 tests

bench: $(STAMP)
	$(BIN)/python bench/soft_mask.py

clean:
	rm -rf $(VENV) runs
