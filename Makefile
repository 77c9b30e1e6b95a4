# Two commands on a fresh clone (see README.md):
#   make engine MODEL=segformer    set up .venv on first use, then export -> passes -> engine -> verify
#   make test                      set up .venv on first use, then run the test suite
#
# Every user variable reaches the commands through the environment and is expanded by the shell in
# double quotes ("$$MODEL"), never pasted into the command line by make: MODEL="x; rm -rf ~" is a
# model name that does not exist, OUT="my build" is a folder with a space, PROMPT='say "hi"' keeps
# its quotes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= $(if $(CHECKPOINT),,segformer)
BACKEND ?= auto
PRECISION ?= fp32
OUT ?= build
CHECKPOINT ?=
PROMPT ?= def main():
UTILITY ?= 0
FOCUS ?=
MAX_NEW_TOKENS ?= 32
REPO ?= $(OUT)/triton
export MODEL BACKEND PRECISION OUT CHECKPOINT PROMPT UTILITY FOCUS MAX_NEW_TOKENS REPO
STAMP := $(VENV)/.installed-stamp
# The Triton 2.51 server binary (with its Python backend); installed without its numpy<2 pin.
PYTRITON := nvidia-pytriton==0.7.0
# The build's name: MODEL, or without one the checkpoint folder's, as `aim engine` names it.
NAME = name="$${MODEL:-$$($(PY) -c 'import sys; from aim.tasks.checkpoint import build_name; print(build_name(sys.argv[1]))' "$$CHECKPOINT")}"
# The engine of that name under OUT, built first if its folder has no manifest yet.
BUILT = $(NAME) && { test -f "$$OUT/$$name/manifest.json" || $(PY) -m aim.cli engine $${MODEL:+"$$MODEL"} --out "$$OUT" --backend "$$BACKEND" --precision "$$PRECISION" $${CHECKPOINT:+--checkpoint "$$CHECKPOINT"}; }

.PHONY: engine generate triton serve test models bench clean help train eval calibrate

help:
	@echo "make engine MODEL=resnet|segformer|llama [CHECKPOINT=dir] [BACKEND=auto|onnxruntime|tensorrt|tensorrt-rtx] [PRECISION=fp32|fp16] [OUT=build]"
	@echo "make engine CHECKPOINT=dir   any supported architecture of the three tasks (make models), into OUT/<folder name>"
	@echo "make triton MODEL=x [REPO=build/triton]   Triton model repository for the engine (builds it if missing)"
	@echo "make serve MODEL=x [REPO=build/triton]    Triton server on that repository (Ctrl-C stops it)"
	@echo "make generate MODEL=llama PROMPT=\"...\" [UTILITY=0.5] [FOCUS=\"+word=5,-other=10\"] [MAX_NEW_TOKENS=32]"
	@echo "make test      the test suite"
	@echo "make models    list the model families, and checkpoint architectures by task"
	@echo "make bench     modulation's cost as ratios (realistic sizes, a few minutes): build/bench/bench.json"
	@echo "make train MODEL=x       train the family's small model on package-shipped data (cached in build/trained/x)"
	@echo "make eval MODEL=x        utility and focus sweeps through the engine, measured vs theory: build/x/eval/"
	@echo "make calibrate MODEL=x   level -> sigma table and an engine taking utility_level in [0, 1]"

# torch first, from the CPU wheel on the machine's disk: otherwise pip resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off torch==2.13.0
	$(PY) -m pip install --quiet --progress-bar off -e '.[test,rtx,triton]'
	$(PY) -m pip install --quiet --progress-bar off --no-deps $(PYTRITON)
	@touch $(STAMP)

engine: $(STAMP)
	$(PY) -m aim.cli engine $${MODEL:+"$$MODEL"} --out "$$OUT" --backend "$$BACKEND" --precision "$$PRECISION" $${CHECKPOINT:+--checkpoint "$$CHECKPOINT"}

triton: $(STAMP)
	$(BUILT) && $(PY) -m aim.cli triton "$$OUT/$$name" --repository "$$REPO"

serve: triton
	$(NAME) && $(PY) -m aim.cli serve "$$REPO" --model "$$name"

generate: $(STAMP)
	$(BUILT) && $(PY) -m aim.cli generate "$$OUT/$$name" --prompt "$$PROMPT" --utility "$$UTILITY" --max-new-tokens "$$MAX_NEW_TOKENS" $${FOCUS:+--focus="$$FOCUS"}

train: $(STAMP)
	$(PY) -m aim.cli train "$$MODEL"

eval: $(STAMP)
	$(PY) -m aim.cli eval "$$MODEL" --out "$$OUT" $${CHECKPOINT:+--checkpoint "$$CHECKPOINT"}

calibrate: $(STAMP)
	$(PY) -m aim.cli calibrate "$$MODEL" --out "$$OUT" $${CHECKPOINT:+--checkpoint "$$CHECKPOINT"}

models: $(STAMP)
	$(PY) -m aim.cli models

bench: $(STAMP)
	$(PY) -m aim.benchmarks --out "$$OUT/bench"

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf -- "$$OUT"
