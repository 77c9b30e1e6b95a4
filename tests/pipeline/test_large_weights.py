"""A model whose weights are in an external data file (as every model past 2 GiB is): the graph passes
and the FP16 pass hold no more memory than a few of its tensors, the graphs share one weights file,
and they still compute what numpy computes. The 1.1B case is `make scale-check`."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from aim.runtime.onnxruntime import build
from aim.weights import data_files, save_model
from tests.test_weights import chain_model, chain_reference, per_tensor_files

LAYERS, WIDTH, CLASSES = 24, 1024, 1000  # 101 MB of FP32 weights, no tensor above 4% of them
ROOT = Path(__file__).resolve().parents[2]

# The passes in a fresh process: its peak resident memory above what it held before them (imports done).
PASSES = """
import sys
from pathlib import Path
from aim.pipeline import memory, steps
from aim.tasks import get_task
import aim.graph_passes.fp16, aim.graph_passes.trt_support, aim.runtime.tensorrt
folder = Path(sys.argv[1])
step = memory.StepPeak()
steps.passes(folder, folder / "exported.onnx", sys.argv[2], "onnxruntime", get_task("image-classification").class_axis)
before, peak = step.stop()
print(peak - before)
"""


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    hidden = [
        rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) / np.float32(np.sqrt(WIDTH)) for _ in range(LAYERS - 1)
    ]
    return hidden + [rng.standard_normal((WIDTH, CLASSES), dtype=np.float32) / np.float32(np.sqrt(WIDTH))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, weights):
    """exported.onnx and exported.onnx.data, made as the export step makes them from torch's files."""
    root = tmp_path_factory.mktemp("large")
    per_tensor_files(chain_model(weights), root / "scratch")
    model = onnx.load(str(root / "scratch" / "model.onnx"), load_external_data=False)
    return save_model(model, root / "build" / "exported.onnx", weights_dir=root / "scratch")


def run_passes(folder: Path, precision: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PASSES, str(folder), precision], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = len(x)
    feed = {"x": x, "utility": np.zeros(batch, np.float32), "focus": np.zeros((batch, CLASSES), np.float32)}
    feed.update({name: np.zeros((batch, CLASSES), np.float32) for name in ("noise_utility", "noise_focus")})
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_passes_do_not_hold_the_weights(exported, weights, precision):
    folder = exported.parent
    size = (folder / "exported.onnx.data").stat().st_size
    grown = run_passes(folder, precision)
    graphs = ["exported.onnx", "modulated.onnx", "modulated.verify.onnx"]
    if precision == "fp32":
        # Graphs read without weights: the memory of the graphs, not of the weights (measured 8 MB here;
        # reading the weights costs 100 MB at least).
        assert grown < 0.25 * size, f"the passes grew by {grown / 1e6:.0f} MB over {size / 1e6:.0f} MB of weights"
        shared = {name: ["exported.onnx.data"] for name in graphs}
    else:
        # Each FP32 weight is read, converted and written alone: a few tensors at a time (4% each;
        # measured 16 MB here; all at once would be 150 MB at least).
        assert grown < 0.35 * size, f"the FP16 pass grew by {grown / 1e6:.0f} MB over {size / 1e6:.0f} MB of weights"
        graphs = [name.replace(".onnx", ".fp16.onnx") for name in graphs]
        shared = {name: ["weights.fp16.data"] for name in graphs}
        half = (folder / "weights.fp16.data").stat().st_size
        assert 0.5 * size <= half < 0.52 * size  # the three FP16 graphs' weights, written once
    found = {name: data_files(onnx.load(str(folder / name), load_external_data=False)) for name in graphs}
    assert found == shared
    assert all((folder / name).stat().st_size < 100_000 for name in graphs)  # no weights inside a graph
    x = np.random.default_rng(1).standard_normal((2, WIDTH), dtype=np.float32)
    expected = chain_reference(x, weights)
    if precision == "fp32":  # ONNX Runtime's engine of such a graph keeps its optimised weights beside it
        graphs.append(build(folder / "modulated.onnx", folder / "engine.onnx").name)
        assert data_files(onnx.load(str(folder / "engine.onnx"), load_external_data=False)) == ["engine.onnx.data"]
    for name in graphs[1:]:  # modulated at utility 0, focus 0: the model's logits
        got = logits(folder / name, x)
        if precision == "fp32":
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # fp32 sums of 1024 terms, 24 layers
        else:  # fp16 weights and activations: relative error ~5e-4 per layer, 24 layers
            assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
