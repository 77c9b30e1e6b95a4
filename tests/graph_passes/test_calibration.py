"""The utility-level pass on a hand-made classifier: the embedded level -> sigma map, checked through
ONNX Runtime with the noise injected (verification flavour), against its NumPy twin."""

from __future__ import annotations

import numpy as np
import pytest

from aim.contract import NOISE_FOCUS, NOISE_UTILITY, PREFIX, UTILITY, UTILITY_LEVEL, check_level
from aim.errors import InvalidGraphError, InvalidInputError
from aim.graph_passes.calibration import NAME, add_utility_level, level_to_sigma
from aim.graph_passes.io import load_graph, save_onnx
from aim.graph_passes.modulate import modulate_file
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from tests.conftest import tiny_classifier

TABLE = np.array([40.0, 9.0, 5.0, 2.5, 1.0, 0.0], dtype=np.float32)  # levels 0, 0.2, ..., 1


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    tiny_classifier(folder / "bare.onnx")
    modulate_file(folder / "bare.onnx", folder / "verify.onnx", logits="scores", flavour="verification")
    graph = add_utility_level(load_graph(folder / "verify.onnx"), TABLE)
    return graph, OnnxRuntimeEngine(save_onnx(graph, folder / "calibrated.onnx"))


def test_level_replaces_utility_and_nodes_are_under_the_prefix(calibrated):
    graph, engine = calibrated
    assert UTILITY_LEVEL in engine.inputs and UTILITY not in engine.inputs
    new = [node for node in graph.nodes if node.name.startswith(NAME)]
    assert {node.op for node in new} >= {"Gather", "Clip", "Floor", "Cast"}
    assert all(node.name.startswith(PREFIX + "/") for node in new)  # fp16 conversion keeps them FP32


def test_embedded_map_matches_its_twin_and_the_table(calibrated):
    _, engine = calibrated
    levels = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.1, 0.37, 0.95, 0.999, -0.5, 3.0, np.nan], dtype=np.float32)
    batch = levels.size
    x = np.random.default_rng(0).normal(size=(batch, 6)).astype(np.float32)
    n1 = np.ones([batch, 5], dtype=np.float32)  # z' - z is then sigma itself
    zero = np.zeros([batch, 5], dtype=np.float32)
    feed = {"x": x, UTILITY_LEVEL: levels, "focus": zero, NOISE_UTILITY: n1, NOISE_FOCUS: zero}
    clean = engine.infer({**feed, NOISE_UTILITY: zero})["scores"]
    sigma = (engine.infer(feed)["scores"] - clean)[:, 0]
    np.testing.assert_allclose(sigma[:6], TABLE, rtol=1e-5, atol=1e-4)  # the table's own points
    np.testing.assert_allclose(sigma[6:10], np.interp(levels[6:10], np.linspace(0, 1, 6), TABLE), rtol=1e-5, atol=1e-4)
    assert sigma[10] == pytest.approx(TABLE[0], rel=1e-5) and sigma[11] == 0.0  # clipped to [0, 1]
    assert sigma[12] == pytest.approx(TABLE[0], rel=1e-5)  # NaN counts as level 0 (fail closed), not 1
    np.testing.assert_allclose(sigma, level_to_sigma(levels, TABLE), rtol=1e-5, atol=1e-4)


def test_level_one_is_exact(calibrated):
    _, engine = calibrated
    x = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    noise = np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32)
    zero = np.zeros_like(noise)
    out = engine.infer(
        {"x": x, UTILITY_LEVEL: np.ones(3, np.float32), "focus": zero, NOISE_UTILITY: noise, NOISE_FOCUS: noise}
    )
    bare = engine.infer(
        {"x": x, UTILITY_LEVEL: np.ones(3, np.float32), "focus": zero, NOISE_UTILITY: zero, NOISE_FOCUS: zero}
    )
    assert np.array_equal(out["scores"], bare["scores"])


def test_bad_tables_graphs_and_levels_are_refused(tmp_path, calibrated):
    graph, _ = calibrated
    tiny_classifier(tmp_path / "bare.onnx")
    with pytest.raises(InvalidGraphError, match="modulate it first"):
        add_utility_level(load_graph(tmp_path / "bare.onnx"), TABLE)
    with pytest.raises(InvalidGraphError, match="calibrated already"):
        add_utility_level(graph.copy(), TABLE)
    modulate_file(tmp_path / "bare.onnx", tmp_path / "mod.onnx", logits="scores")
    for table, message in (([0.0, 1.0], "must not increase"), ([1.0], "at least 2"), ([np.nan, 0.0], "finite")):
        with pytest.raises(InvalidInputError, match=message):
            add_utility_level(load_graph(tmp_path / "mod.onnx"), table)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        check_level([0.5, 1.5], 2)
    with pytest.raises(InvalidInputError, match="one value per sample"):
        check_level([0.5, 0.5, 0.5], 2)


def test_fp16_conversion_keeps_the_level_map_in_fp32(calibrated, tmp_path):
    """The table and interpolation are named under the redistribution prefix, so the FP16 pass leaves
    them FP32 (the table stays a FLOAT initializer, the level input stays FLOAT), and the FP16 engine
    still applies the table's sigmas (within FP16's rounding of the output logits)."""
    import onnx
    import onnx_graphsurgeon as gs

    from aim.graph_passes.fp16 import convert_to_fp16

    graph, _ = calibrated
    table = np.array([1000.1, 3.3, 0.1, 0.0], dtype=np.float32)  # not representable in FP16
    levels = np.array([0.0, 1 / 3, 2 / 3, 1.0], dtype=np.float32)
    source = graph.copy()
    for tensor in source.tensors().values():  # re-embed another table in a copy of the calibrated graph
        if tensor.name.endswith("calibration/table"):
            tensor.values = table
        elif tensor.name.endswith("calibration/table_next"):
            tensor.values = table[1:].copy()
        elif tensor.name.endswith("calibration/steps"):
            tensor.values = np.float32(table.size - 1)
        elif tensor.name.endswith("calibration/last_start"):
            tensor.values = np.float32(table.size - 2)
    half = convert_to_fp16(gs.export_onnx(source))
    initializers = {init.name: init for init in half.graph.initializer}
    assert initializers[f"{NAME}/table"].data_type == onnx.TensorProto.FLOAT
    level_input = next(i for i in half.graph.input if i.name == UTILITY_LEVEL)
    assert level_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    onnx.save(half, str(tmp_path / "half.onnx"))
    engine = OnnxRuntimeEngine(tmp_path / "half.onnx")
    zero = np.zeros([4, 5], dtype=np.float32)
    ones = np.ones([4, 5], dtype=np.float32)
    x = np.zeros([4, 6], dtype=engine.inputs["x"][0])
    feed = {"x": x, UTILITY_LEVEL: levels, "focus": zero, NOISE_UTILITY: ones, NOISE_FOCUS: zero}
    noisy = engine.infer(feed)["scores"].astype(np.float64)
    clean = engine.infer({**feed, NOISE_UTILITY: zero})["scores"].astype(np.float64)
    # the logits are FP16 at the output, so compare sigma within FP16's rounding of z + sigma
    np.testing.assert_allclose((noisy - clean)[:, 0], table, rtol=2e-3, atol=2e-3)
