"""The ONNX Runtime engine: build, run, and clear errors for bad input."""

import numpy as np
import pytest

from aim.errors import InvalidGraphError, InvalidInputError
from aim.graph_passes.modulate import modulate_file
from aim.runtime.onnxruntime import OnnxRuntimeEngine, build
from tests.conftest import tiny_classifier


@pytest.fixture
def engine(tmp_path):
    source = tiny_classifier(tmp_path / "classifier.onnx")
    modulated = modulate_file(source, tmp_path / "modulated.onnx", "scores", 1)
    return OnnxRuntimeEngine(build(modulated, tmp_path / "engine.onnx"))


X = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)


def test_built_engine_is_a_saved_optimised_model(tmp_path, engine):
    assert engine.path.is_file() and engine.modulated and engine.num_classes == 5
    assert sorted(engine.inputs) == ["focus", "utility", "x"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_utility_zero_is_exact_and_broadcasts(tmp_path, engine):
    bare = OnnxRuntimeEngine(tmp_path / "classifier.onnx").infer({"x": X})["scores"]
    assert np.array_equal(engine.run({"x": X}, 0.0), bare)
    boosted = engine.run({"x": X}, 0.0, focus=[0, 0, 0, 0, 50.0])
    assert np.all(boosted[:, 4] > bare[:, 4]) and np.array_equal(boosted[:, :4], bare[:, :4])


@pytest.mark.parametrize(
    "utility, focus, message",
    [
        (float("nan"), None, "utility must be finite"),
        (float("inf"), None, "utility must be finite"),
        (-1.0, None, r"must lie in \[0, 10000\]"),
        ([1.0, 2.0, 3.0], None, "one value per sample"),
        (0.0, [1.0, 2.0], r"one value per class \(5\)"),
        (0.0, np.full((3, 5), 1.0), r"shape \[3, 5\]"),
        (0.0, [0, 0, float("nan"), 0, 0], "focus must be finite"),
    ],
)
def test_bad_knobs_are_refused(engine, utility, focus, message):
    with pytest.raises(InvalidInputError, match=message):
        engine.run({"x": X}, utility, focus)


def test_bad_feeds_are_refused(engine):
    zero = {"utility": np.zeros(2, np.float32), "focus": np.zeros((2, 5), np.float32)}
    with pytest.raises(InvalidInputError, match=r"missing \['x'\]"):
        engine.infer(zero)
    with pytest.raises(InvalidInputError, match=r"unexpected \['y'\]"):
        engine.infer({**zero, "x": X, "y": X})
    with pytest.raises(InvalidInputError, match="built for 6"):  # an engine built for other shapes
        engine.infer({**zero, "x": np.zeros((2, 7), np.float32)})
    with pytest.raises(InvalidInputError, match="rank 2"):
        engine.infer({**zero, "x": np.zeros((2, 6, 1), np.float32)})
    with pytest.raises(InvalidInputError, match="dim 'batch' is 2 in input 'utility' but 3 in 'x'"):
        engine.infer({**zero, "x": np.zeros((3, 6), np.float32)})
    with pytest.raises(InvalidInputError, match="must be float32"):
        engine.infer({**zero, "x": np.zeros((2, 6), np.complex64)})


def test_bare_engine_refuses_knobs(tmp_path, engine):
    bare = OnnxRuntimeEngine(tmp_path / "classifier.onnx")
    with pytest.raises(InvalidInputError, match="not modulated"):
        bare.run({"x": X}, utility=1.0)


def test_corrupt_files(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"garbage" * 100)
    with pytest.raises(InvalidGraphError, match="cannot load .*corrupt.onnx"):
        OnnxRuntimeEngine(corrupt)
    with pytest.raises(InvalidGraphError, match="cannot load"):
        build(corrupt, tmp_path / "engine.onnx")
    with pytest.raises(InvalidGraphError, match="no such"):
        OnnxRuntimeEngine(tmp_path / "missing.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.onnx"]


def test_a_failed_write_is_not_called_a_bad_graph(tmp_path, monkeypatch):
    """A full disk while ONNX Runtime saves the optimised engine said "Rebuild it from a valid ONNX file"
    (make bench, 2026-12-06). ONNX Runtime 1.32's words then, planted here as its session raises them."""
    import onnxruntime as ort

    from aim.errors import AimError

    source = tiny_classifier(tmp_path / "classifier.onnx")

    def full_disk(*args, **kwargs):
        raise RuntimeError(
            "[ONNXRuntimeError] : 1 : FAIL : graph.cc:5468 AddExternalInitializersToGraphProtoImpl Failed to write "
            'external initializers to file: "engine.onnx.data"'
        )

    monkeypatch.setattr(ort, "InferenceSession", full_disk)
    with pytest.raises(AimError, match="could not write the engine .* disk full") as raised:
        build(source, tmp_path / "engine.onnx")
    assert "valid ONNX" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.onnx"]  # nothing half-written
