"""The pipeline of `make engine`: one build for every source.

request.py       BuildRequest: OUT, backend, precision, noise and key, seed, largest batch
source.py        the Source protocol; model_source.py (a family, a checkpoint folder) and
                 onnx_source.py (a user's ONNX) implement it
builder.py       build(source, request) -> Build; reusable(source, request): the one reuse rule
steps.py         the steps every build shares (graph passes, engines) and a PyTorch model's own
engine_runs.py   the engines run once for the checks (RunResults); verify.py judges them and
                 re-verifies a build folder (`aim verify`)
batch.py, memory.py, progress.py, report.py   the largest batch, per-step memory, the log, the summary
"""
