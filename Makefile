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
NOISE ?= fresh
NOISE_KEY ?=
OUT ?= build
CHECKPOINT ?=
PROMPT ?= def main():
UTILITY ?= 0
FOCUS ?=
MAX_NEW_TOKENS ?= 32
REPEATS ?= 1000
REPO ?= $(OUT)/triton
# The owner's tier table (make triton/serve TIERS=tiers.json): each request's tier comes from its key.
TIERS ?=
# Your own ONNX instead of MODEL (make engine ONNX=yours.onnx LOGITS=scores MAX_SHAPES=image:32x3x224x224).
ONNX ?=
LOGITS ?= logits
CLASS_AXIS ?=
TASK ?= image-classification
MIN_SHAPES ?=
OPT_SHAPES ?=
MAX_SHAPES ?=
INPUTS ?=
UPSAMPLE_TO ?=
DATA ?=
# make bench: QUICK=1 runs tiny models (checks the bench itself); BENCH_MODELS=resnet,generation a part of it.
QUICK ?=
BENCH_MODELS ?=
# The engine profile's largest batch (Triton's max_batch_size follows it); empty: the default that serves.
MAX_BATCH ?=
export MAX_BATCH MODEL BACKEND PRECISION NOISE NOISE_KEY OUT CHECKPOINT PROMPT UTILITY FOCUS MAX_NEW_TOKENS REPO TIERS ONNX LOGITS CLASS_AXIS TASK MIN_SHAPES OPT_SHAPES MAX_SHAPES INPUTS UPSAMPLE_TO DATA REPEATS QUICK BENCH_MODELS SCALE KEYS
STAMP := $(VENV)/.installed-stamp
# The Triton 2.51 server binary (with its Python backend); installed without its numpy<2 pin.
PYTRITON := nvidia-pytriton==0.7.0
# The model to build: `set --` makes it the shell's arguments, --onnx and its flags when ONNX is given, else
# MODEL and/or CHECKPOINT (a checkpoint alone is built as its own architecture).
SOURCE = if [ -n "$$ONNX" ]; then set -- --onnx "$$ONNX" --logits "$$LOGITS" --task "$$TASK" $${CLASS_AXIS:+--class-axis "$$CLASS_AXIS"} \
	$${MIN_SHAPES:+--min-shapes "$$MIN_SHAPES"} $${OPT_SHAPES:+--opt-shapes "$$OPT_SHAPES"} $${MAX_SHAPES:+--max-shapes "$$MAX_SHAPES"} \
	$${INPUTS:+--inputs "$$INPUTS"} $${UPSAMPLE_TO:+--upsample-to "$$UPSAMPLE_TO"}; else set -- $${MODEL:+"$$MODEL"} $${CHECKPOINT:+--checkpoint "$$CHECKPOINT"}; fi
# How the engine is built: backend, precision, the production noise (fresh, or keyed by a key file), largest batch.
BUILD_FLAGS = --out "$$OUT" --backend "$$BACKEND" --precision "$$PRECISION" --noise "$$NOISE" $${NOISE_KEY:+--noise-key "$$NOISE_KEY"} \
	$${MAX_BATCH:+--max-batch "$$MAX_BATCH"}
# The build's name: the ONNX file's stem, MODEL, or without one the checkpoint folder's, as `aim engine` names it.
NAME = if [ -n "$$ONNX" ]; then name="$$(basename "$$ONNX" .onnx)"; else \
	name="$${MODEL:-$$($(PY) -c 'import sys; from aim.families.from_checkpoint import build_name; print(build_name(sys.argv[1]))' "$$CHECKPOINT")}"; fi
# The engine of that name under OUT, built first unless the folder holds a verified build made as asked (weights
# or file, BACKEND, PRECISION, NOISE and NOISE_KEY, MAX_BATCH) whose every file has its recorded hash (`aim engine
# --reuse`, pipeline/builder.reusable): `make triton NOISE=keyed` never serves a fresh-noise build.
BUILT = $(NAME) && { $(SOURCE); $(PY) -m aim.cli engine "$$@" $(BUILD_FLAGS) --reuse; }

.PHONY: engine generate triton serve loadtest test format models bench clean help train eval calibrate attack false-alarms scale-check

# One line per target; the CLI's commands are listed by `aim --help` (tests/cli/test_command_list.py).
help:
	@echo "make engine MODEL=resnet|segformer|llama | CHECKPOINT=dir | ONNX=yours.onnx LOGITS=name MAX_SHAPES=input:32x3x224x224"
	@echo "            [BACKEND=auto|onnxruntime|tensorrt|tensorrt-rtx] [PRECISION=fp32|fp16|int4|int8] [NOISE=fresh|keyed [NOISE_KEY=file]] [OUT=build]"
	@echo "            export -> graph passes -> engine -> verify into OUT/NAME/ (ONNX also takes MIN_SHAPES, OPT_SHAPES, CLASS_AXIS, TASK, INPUTS, UPSAMPLE_TO)"
	@echo "make test          ruff check, ruff format --check, then the test suite"
	@echo "make format        ruff's lint fixes and formatting, as make test checks them"
	@echo "make models        the model families, and checkpoint architectures by task"
	@echo "make generate MODEL=llama PROMPT=\"...\" [UTILITY=0.5] [FOCUS=\"+word=5,-other=10\"] [MAX_NEW_TOKENS=32]   text, streamed"
	@echo "make triton MODEL=x [REPO=build/triton] [TIERS=tiers.json]   Triton model repository entries for the engine"
	@echo "make serve MODEL=x [REPO=build/triton] [TIERS=tiers.json]    the Triton server on that repository (Ctrl-C stops it)"
	@echo "make loadtest MODEL=x       modulated beside bare, tiered beside untiered, on the real server under load: OUT/loadtest/"
	@echo "make train MODEL=x          the family's small model on package-shipped data (cached in build/trained/x)"
	@echo "make eval MODEL=x           utility and focus sweeps through the engine, measured vs theory: OUT/x/eval/"
	@echo "make calibrate MODEL=x | ONNX=.. LOGITS=.. MAX_SHAPES=.. DATA=unlabeled.npy   level -> sigma, an engine taking utility_level"
	@echo "make attack MODEL=x [NOISE_KEY=file] [KEYS=16]   repeat-and-average attack on fresh vs keyed noise; one query over KEYS keys: OUT/x/attack/"
	@echo "make bench [QUICK=1] [BENCH_MODELS=resnet,generation]   modulation's cost as ratios with 95% intervals: OUT/bench/bench.json"
	@echo "make false-alarms MODEL=x [REPEATS=1000]   the statistical checks' false alarms and misses, measured"
	@echo "make scale-check            a TinyLlama-1.1B-shaped bf16 checkpoint through make engine (~10 GB RAM, 15 GB disk)"
	@echo "    [SCALE=7b]              a Mistral-7B-shaped bf16 checkpoint in fp16, up to its engine (~20 GB RAM, 30 GB disk)"
	@echo "make clean                  remove OUT"
	@echo "The CLI's commands: aim --help (.venv/bin/aim). Targets that need an engine build it first unless OUT/NAME holds one made as asked."

# torch first, from the CPU wheel on the machine's disk: otherwise pip resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off torch==2.13.0
	$(PY) -m pip install --quiet --progress-bar off -e '.[test,rtx,triton]'
	$(PY) -m pip install --quiet --progress-bar off --no-deps $(PYTRITON)
	@touch $(STAMP)

engine: $(STAMP)
	$(SOURCE); $(PY) -m aim.cli engine "$$@" $(BUILD_FLAGS)

triton: $(STAMP)
	$(BUILT) && $(PY) -m aim.cli triton "$$OUT/$$name" --repository "$$REPO" $${TIERS:+--tiers "$$TIERS"}

# The build's model, and its text model where `aim triton` wrote one (a text-generation build).
serve: triton
	$(NAME) && set -- --model "$$name" && if [ -d "$$REPO/$$name-text" ]; then set -- "$$@" --model "$$name-text"; fi; \
	$(PY) -m aim.cli serve "$$REPO" "$$@"

loadtest: $(STAMP)
	$(BUILT) && $(PY) -m aim.cli loadtest "$$OUT/$$name" --out "$$OUT/loadtest"

# make strips the blanks that begin a command-line value (PROMPT=" The" becomes "The", another question):
# the prompt as typed is read back from make's own arguments (/proc/<make>/cmdline, Linux), else as make has it.
# The trailing x keeps a trailing newline of the prompt through $$( ).
TYPED_PROMPT = prompt="$$($(PY) -c 'import sys, pathlib; f = pathlib.Path(f"/proc/{sys.argv[1]}/cmdline"); \
	typed = [a[7:] for a in (f.read_bytes().split(b"\0") if f.exists() else []) if a.startswith(b"PROMPT=")]; \
	t = typed[-1].decode(errors="replace") if typed else ""; print(t if t.lstrip() == sys.argv[2] else sys.argv[2], end="x")' \
	"$$PPID" "$$PROMPT")" && prompt="$${prompt%x}"

generate: $(STAMP)
	$(BUILT) && $(TYPED_PROMPT) && $(PY) -m aim.cli generate "$$OUT/$$name" --prompt "$$prompt" --utility "$$UTILITY" --max-new-tokens "$$MAX_NEW_TOKENS" $${FOCUS:+--focus="$$FOCUS"}

train: $(STAMP)
	$(PY) -m aim.cli train "$$MODEL"

eval: $(STAMP)
	$(PY) -m aim.cli eval "$$MODEL" --out "$$OUT" $${CHECKPOINT:+--checkpoint "$$CHECKPOINT"}

calibrate: $(STAMP)
	$(SOURCE); $(PY) -m aim.cli calibrate "$$@" --out "$$OUT" $${DATA:+--data "$$DATA"}

attack: $(STAMP)
	$(PY) -m aim.cli attack "$$MODEL" --out "$$OUT" $${NOISE_KEY:+--noise-key "$$NOISE_KEY"} $${CHECKPOINT:+--checkpoint "$$CHECKPOINT"} $${KEYS:+--keys "$$KEYS"}

models: $(STAMP)
	$(PY) -m aim.cli models

bench: $(STAMP)
	$(PY) -m aim.benchmarks --out "$$OUT/bench" $${BENCH_MODELS:+--models "$$BENCH_MODELS"} $${QUICK:+--quick}

false-alarms: $(STAMP)
	$(BUILT) && $(PY) -m aim.benchmarks.false_alarms "$$OUT/$$name" --repeats "$$REPEATS"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

# Lint fixes and formatting, as `make test` checks them.
format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Real sizes (not in `make test`): the checkpoint is cached in $(OUT)/scale/llama.checkpoint.
scale-check: $(STAMP)
	$(PY) -m aim.benchmarks.scale --out "$$OUT/scale" $${SCALE:+--size "$$SCALE"}

clean:
	rm -rf -- "$$OUT"
