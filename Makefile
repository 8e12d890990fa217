# Two set-up commands (see README):  `make demo` runs the main job, `make test` runs the tests.
# Each creates or reuses the local virtual environment .venv and installs the pinned versions.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export JAX_PLATFORMS := cpu
export MPLBACKEND := Agg

.PHONY: demo test figures bench install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Main job: every theory figure + the tiny CPU bridge testbed, on the embedded default configs.
demo: $(STAMP)
	$(BIN)/resurgence figures --bridge-demo

# Theory figures only (about a minute).
figures: $(STAMP)
	$(BIN)/resurgence figures

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)
