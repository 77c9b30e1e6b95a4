"""FP16 conversion: the redistribution stays FP32 with Casts at its edge, IO types stay, and ONNX Runtime
running the FP16 graph still agrees with PyTorch by the family's FP16 comparator."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from aim.contract import PREFIX
from aim.graph_passes.fp16 import convert_to_fp16, fp32_violations
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.verdicts import Agreement
from aim.verify.compare import agreement


def io_types(m):
    return [(v.name, v.type.tensor_type.elem_type) for v in (*m.graph.input, *m.graph.output)]


def subgraphs(node):
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]


def all_nodes(graph):
    return [n for node in graph.node for n in (node, *(m for g in subgraphs(node) for m in all_nodes(g)))]


def types_of(m):
    types = {}

    def collect(graph):
        types.update({v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)})
        types.update({i.name: i.data_type for i in graph.initializer})
        for node in graph.node:
            for g in subgraphs(node):
                collect(g)

    collect(onnx.shape_inference.infer_shapes(m).graph)
    return types


@pytest.fixture(scope="module")
def half(family, tmp_path_factory):
    """The family's graphs in FP16, written beside the FP32 ones, and the PyTorch reference data."""
    folder = tmp_path_factory.mktemp(f"{family.name}_fp16")
    paths = {}
    for kind in ("bare", "verification"):
        converted = convert_to_fp16(onnx.load(str(family.path(kind))), family.family.fp16_keep_fp32)
        paths[kind] = folder / f"{kind}.fp16.onnx"
        onnx.save(converted, str(paths[kind]))
    return paths, family.reference(seed=0)


@pytest.mark.parametrize("kind", ["production", "verification"])
def test_redistribution_stays_fp32_with_casts_at_its_edge(family, kind):
    original = onnx.load(str(family.path(kind)))
    converted = convert_to_fp16(original, family.family.fp16_keep_fp32)
    assert fp32_violations(converted) == []
    assert fp32_violations(original) == []
    assert io_types(converted) == io_types(original)  # clients see the same interface
    types = types_of(converted)
    assert sum(t == T.FLOAT16 for t in types.values()) > 10  # the model itself really is FP16
    region = [n for n in all_nodes(converted.graph) if n.name.startswith(PREFIX)]
    assert {n.name for n in all_nodes(original.graph) if n.name.startswith(PREFIX)} <= {n.name for n in region}
    edge = [n for n in region if n.op_type == "Cast" and "Cast_to_fp32" in n.name]
    assert edge and all(types[n.input[0]] == T.FLOAT16 and types[n.output[0]] == T.FLOAT for n in edge)
    for node in region:  # every op of the subgraph reads and writes FP32 only (the edge Casts read FP16)
        if node not in edge:
            assert all(types.get(t) != T.FLOAT16 for t in (*node.input, *node.output) if t), node.name


def test_violations_are_detected():
    """The checker of the tests above fails on a region node that computes in FP16."""
    graph = h.make_graph(
        [h.make_node("Abs", ["x"], ["y"], name=f"{PREFIX}/Abs_1")],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT16, [2])],
        [h.make_tensor_value_info("y", T.FLOAT16, [2])],
    )
    assert fp32_violations(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def test_fp16_graph_agrees_with_pytorch_on_onnxruntime(family, half):
    """ONNX Runtime runs the FP16 graphs (FP16 tensors between nodes); the family's comparator holds,
    and the modulation on top is exactly the FP32 arithmetic on the FP16 model's logits."""
    paths, reference = half
    inputs = reference.inputs
    bare = OnnxRuntimeEngine(paths["bare"]).run(inputs)
    modulated = OnnxRuntimeEngine(paths["verification"]).run(
        inputs,
        reference.utility,
        reference.focus,
        noise_utility=reference.noise_utility,
        noise_focus=reference.noise_focus,
    )
    for name, expected, actual in (("bare", reference.logits, bare), ("modulated", reference.modulated, modulated)):
        check = agreement(name, expected, actual, family.family.fp16, family.task.class_axis)
        assert check.passed, check.detail
        assert 0 < check.metrics["max_abs_diff"] < 0.05  # FP16 really differs from FP32, and only a little
    # The noise terms stay FP32: z' - z equals utility * n1 + focus * |n2| computed in FP32. Through
    # FP16, the noise of the sigma-2.5 rows would be off by ~1e-3.
    rank = bare.ndim
    u = reference.utility.reshape([-1] + [1] * (rank - 1))
    f = np.expand_dims(reference.focus, tuple(a for a in range(1, rank) if a != family.task.class_axis))
    expected = (bare + u * reference.noise_utility) + f * np.abs(reference.noise_focus)
    np.testing.assert_allclose(modulated, expected, rtol=1e-6, atol=1e-6)


def test_comparator_fails_on_wrong_logits(family, half):
    _, reference = half
    logits = reference.logits
    shuffled = np.flip(logits, axis=family.task.class_axis)
    check = agreement("shuffled", logits, shuffled, family.family.fp16, family.task.class_axis)
    assert not check.passed and check.metrics["agreement"] < family.family.fp16.min_fraction


def test_resize_scales_stay_fp32_and_subgraph_nodes_stay_whole():
    """Schema-driven: Resize's `scales` must be FP32; an If (with its branches) stays FP32 and reads
    outer FP16 tensors through Casts."""
    then_branch = h.make_graph(
        [h.make_node("Abs", ["y"], ["t"], name="then_abs")], "then", [], [h.make_tensor_value_info("t", T.FLOAT, None)]
    )
    else_branch = h.make_graph(
        [h.make_node("Neg", ["y"], ["e"], name="else_neg")], "else", [], [h.make_tensor_value_info("e", T.FLOAT, None)]
    )
    nodes = [
        h.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", mode="linear"),
        h.make_node("If", ["flag"], ["z"], name="branch", then_branch=then_branch, else_branch=else_branch),
        h.make_node("Mul", ["z", "w"], ["out"], name="scale"),
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 1, 2, 2]), h.make_tensor_value_info("flag", T.BOOL, [])],
        [h.make_tensor_value_info("out", T.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
            numpy_helper.from_array(np.array(3.0, np.float32), "w"),
        ],
    )
    m = convert_to_fp16(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    types = types_of(m)
    resize = next(n for n in m.graph.node if n.name == "resize")
    assert (
        types[resize.input[0]] == T.FLOAT16
        and types[resize.input[2]] == T.FLOAT
        and types[resize.output[0]] == T.FLOAT16
    )
    branch = next(n for n in m.graph.node if n.name == "branch")
    assert types[branch.output[0]] == T.FLOAT
    inner = {n.input[0] for g in (branch.attribute[0].g, branch.attribute[1].g) for n in g.node}
    assert inner == {"y/fp32"}  # the branches read the FP16 tensor through one Cast to FP32
    assert io_types(m) == [("x", T.FLOAT), ("flag", T.BOOL), ("out", T.FLOAT)]
    session = __import__("onnxruntime").InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    out_true = session.run(None, {"x": x, "flag": np.array(True)})[0]
    out_false = session.run(None, {"x": x, "flag": np.array(False)})[0]
    assert out_true.shape == (1, 1, 4, 4) and np.allclose(out_true, -out_false) and out_true.max() == pytest.approx(9.0)


def test_agreement_config_is_stated_per_family(family):
    spec = family.family.fp16
    assert (
        isinstance(spec, Agreement)
        and spec.metric in ("top_k", "class_map")
        and 0 < spec.min_fraction <= 1
        and spec.why
    )


def test_model_nodes_moved_into_the_region_if_come_back_out(family):
    """The redistribution moves the logits' producer into its If branches (no copy on the skip path);
    in FP16 what both branches compute runs once before the If, in FP16 as in the bare graph. Where the
    noisy branch works in class blocks (maps: the upsampling done per block), the producer's block copies
    and the skip branch's producer stay in their branches, and utility 0 still gives the bare FP16
    graph's logits bit for bit."""
    original = onnx.load(str(family.path("production")))
    converted = convert_to_fp16(original, family.family.fp16_keep_fp32)

    def model_nodes_in_branches(m):
        (region_if,) = [n for n in m.graph.node if n.op_type == "If" and n.name.startswith(PREFIX)]
        return [n for g in subgraphs(region_if) for n in all_nodes(g) if not n.name.startswith(PREFIX)]

    moved = model_nodes_in_branches(original)
    if family.task.upsample_logits_to is None:
        assert model_nodes_in_branches(converted) == []
        types = types_of(converted)
        for node in moved:  # one copy of each now at the top, computing in FP16
            (hoisted,) = [n for n in converted.graph.node if n.op_type == node.op_type and n.input[0] == node.input[0]]
            assert types[hoisted.output[0]] == T.FLOAT16
        return
    left = [n for n in model_nodes_in_branches(converted) if n.op_type != "Cast"]  # not the FP16 side's Casts
    assert len(left) == len(moved) > 2 and {n.op_type for n in left} == {"Resize"}
    bare = convert_to_fp16(onnx.load(str(family.path("bare"))), family.family.fp16_keep_fp32)
    engines = []
    for model, name in ((bare, "bare"), (converted, "production")):
        onnx.save(model, str(family.folder / f"{name}.fp16.utility0.onnx"))
        engines.append(OnnxRuntimeEngine(family.folder / f"{name}.fp16.utility0.onnx"))
    feed = {name: tensor.numpy() for name, tensor in family.inputs().items()}
    np.testing.assert_array_equal(engines[1].run(feed, 0.0), engines[0].run(feed))
