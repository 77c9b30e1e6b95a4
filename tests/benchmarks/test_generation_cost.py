"""The variants tree of aim/benchmarks/generation_cost.py on a tiny model: each selection computes its
own leaf (the bare logits, or the leaf's subgraph applied to them, bit for bit as that subgraph alone),
the model's other outputs are untouched, and the per-round ratios are the medians of a / b."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from aim.benchmarks.generation_cost import Leaves, identity_graph, profile, ratios, variants_tree
from aim.graph_passes.modulate import modulate_file
from aim.graph_passes.noise_key import NoiseKey

CLASSES = 16


def tiny_model(path):
    weights = np.random.default_rng(0).normal(size=(3, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["tokens", "w"], ["logits"]), helper.make_node("Relu", ["tokens"], ["present"])],
        "tiny",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
            helper.make_tensor_value_info("present", TensorProto.FLOAT, ["batch", 3]),
        ],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tree")
    model = tiny_model(folder / "model.onnx")
    identity = identity_graph(folder / "identity.onnx", CLASSES)
    subgraphs = {
        "keyed": modulate_file(identity, folder / "keyed.onnx", key=NoiseKey(bytes(range(32)))),
        "other key": modulate_file(identity, folder / "other.onnx", key=NoiseKey(bytes(range(1, 33)))),
        "fresh": modulate_file(identity, folder / "fresh.onnx"),
    }
    leaves = {"bare": None, "keyed": subgraphs["keyed"], "fresh": subgraphs["fresh"], "bare 2": None}
    leaves.update({"other key": subgraphs["other key"], "bare 3": None, "bare 4": None, "bare 5": None})
    tree = variants_tree(model, leaves, folder / "tree.onnx")
    inputs = {"tokens": np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)}
    return model, subgraphs, Leaves(tree, list(leaves), inputs, utility=2.0), inputs, tree


def test_each_selection_computes_its_own_leaf(world):
    model, subgraphs, runs, inputs, _ = world
    bare, present = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, inputs)
    knobs = {"utility": np.full(2, 2.0, np.float32), "focus": np.zeros((2, CLASSES), np.float32)}
    for name in ("bare", "bare 2", "bare 5"):
        np.testing.assert_array_equal(runs.logits(name), bare)
    for name in ("keyed", "other key"):  # keyed noise: the same bits as the subgraph alone on the bare logits
        alone = ort.InferenceSession(str(subgraphs[name]), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(runs.logits(name), alone.run(None, {"x": bare, **knobs})[0])
    fresh = runs.logits("fresh")
    assert np.all(np.isfinite(fresh)) and np.abs(fresh - bare).max() > 0.1
    np.testing.assert_array_equal(runs.run("keyed")[1], present)  # the model's other outputs as they were


def test_timing_gives_every_leaf_a_value_per_round_and_ratios_are_medians_of_a_over_b(world):
    times = world[2].time(rounds=3, per_round=1, warmup=0)
    assert {name: len(t) for name, t in times.items()} == {name: 3 for name in world[2].names}
    synthetic = {"a": np.array([2.0, 3.0, 4.0]), "b": np.array([1.0, 2.0, 4.0])}
    (figure,) = ratios(synthetic, [("a", "b")])
    assert figure["value"] == np.median([2.0, 1.5, 1.0]) and figure["difference_ms"][0] == 1.0


def test_a_tree_needs_a_power_of_two_of_leaves(tmp_path):
    with pytest.raises(ValueError, match="power of two"):
        variants_tree(tiny_model(tmp_path / "m.onnx"), {"a": None, "b": None, "c": None}, tmp_path / "t.onnx")


def test_the_profile_of_a_leaf_holds_its_own_nodes_and_no_other_leafs(world):
    runs, inputs, tree = world[2], world[3], world[4]
    found = profile(tree, runs.names, inputs, utility=2.0, runs=2)
    assert any(node.startswith("keyed/aim_redistribution/") for node in found["keyed"])
    assert not any(node.startswith(("keyed/", "fresh/")) for node in found["bare"])
    assert "MatMul" in " ".join(found["bare"])  # the model ran
