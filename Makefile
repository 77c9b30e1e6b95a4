# Two commands on a fresh clone (see README.md):
#   make engine MODEL=segformer    set up .venv on first use, then export -> passes -> engine -> verify
#   make test                      set up .venv on first use, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= segformer
BACKEND ?= onnxruntime
OUT ?= build
CHECKPOINT ?=
PROMPT ?= def main():
UTILITY ?= 0
FOCUS ?=
MAX_NEW_TOKENS ?= 32
STAMP := $(VENV)/.installed-stamp

.PHONY: engine generate test models bench clean help

help:
	@echo "make engine MODEL=resnet|segformer|llama [CHECKPOINT=dir] [BACKEND=onnxruntime] [OUT=build]"
	@echo "make generate MODEL=llama PROMPT=\"...\" [UTILITY=0.5] [FOCUS=\"+word=5,-other=10\"] [MAX_NEW_TOKENS=32]"
	@echo "make test      the test suite"
	@echo "make models    list the model families"
	@echo "make bench     modulation's cost as ratios (realistic sizes, a few minutes): build/bench/bench.json"

# torch first, from the CPU wheel on the machine's disk: otherwise pip resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off torch==2.13.0
	$(PY) -m pip install --quiet --progress-bar off -e '.[test]'
	@touch $(STAMP)

engine: $(STAMP)
	$(PY) -m cli engine $(MODEL) --out $(OUT) --backend $(BACKEND) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

# Builds the engine first if there is none yet.
generate: $(STAMP)
	@test -f $(OUT)/$(MODEL)/manifest.json || $(MAKE) --no-print-directory engine MODEL=$(MODEL) OUT=$(OUT) BACKEND=$(BACKEND) CHECKPOINT=$(CHECKPOINT)
	$(PY) -m cli generate $(OUT)/$(MODEL) --prompt "$(PROMPT)" --utility $(UTILITY) --max-new-tokens $(MAX_NEW_TOKENS) $(if $(FOCUS),--focus "$(FOCUS)")

models: $(STAMP)
	$(PY) -m cli models

bench: $(STAMP)
	$(PY) -m benchmarks --out $(OUT)/bench

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(OUT)
