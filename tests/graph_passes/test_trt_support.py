"""The TensorRT compatibility check: every modulated family passes; graphs built to break it fail, naming the node."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

from aim.graph_passes.trt_support import UnsupportedGraphError, check_tensorrt_support, load_table


def model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = h.make_graph(nodes, "broken", inputs, outputs, initializer=list(initializers))
    return h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])


def tensor(name, dtype=T.FLOAT, shape=(2, 8)):
    return h.make_tensor_value_info(name, dtype, list(shape) if shape is not None else None)


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


def count_nodes(graph):
    return sum(
        1 + sum(count_nodes(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH) for node in graph.node
    )


def errors_of(m):
    return {f.node: f.reason for f in check_tensorrt_support(m).errors}


@pytest.mark.parametrize("kind", ["bare", "production", "verification"])
def test_every_family_and_flavour_passes(family, kind):
    report = check_tensorrt_support(family.path(kind))
    assert report.ok, report.summary()
    assert report.nodes == count_nodes(onnx.load(str(family.path(kind))).graph)  # every node, in subgraphs too


def test_table_cites_its_source_and_covers_the_ops_the_subgraph_may_use():
    table = load_table()
    assert "onnx-tensorrt" in table["source"]["document"] and table["source"]["tensorrt_version"]
    assert (table["opset"]["min"], table["opset"]["max"]) == (9, 24)
    ops = table["operators"]
    for op in [
        "If",
        "IsNaN",
        "Where",
        "Clip",
        "Min",
        "Max",
        "Abs",
        "ReduceMax",
        "Greater",
        "Or",
        "RandomUniformLike",
        "RandomNormalLike",
        "Log",
        "Sqrt",
        "Cos",
        "Sin",
        "Concat",
        "Slice",
        "Split",
        "Gather",
        "NonZero",
        "MatMul",
        "Einsum",
        "Equal",
        "Range",
        "Cast",
        "Unsqueeze",
        "Mul",
        "Add",
        "Resize",
    ]:
        assert ops[op]["supported"], op
    assert not ops["Unique"]["supported"] and not ops["BitwiseAnd"]["supported"]
    assert len(ops) > 150  # the whole matrix, not only today's graph


def test_topk_above_3840_is_named():
    m = model(
        [h.make_node("TopK", ["x", "k"], ["v", "i"], name="big_topk")],
        [tensor("x", shape=(2, 6000))],
        [tensor("v", shape=None), tensor("i", T.INT64, None)],
        [const("k", [5000])],
    )
    assert "3840" in errors_of(m)["big_topk"] and "5000" in errors_of(m)["big_topk"]
    ok = model(
        [h.make_node("TopK", ["x", "k"], ["v", "i"], name="small_topk")],
        [tensor("x", shape=(2, 6000))],
        [tensor("v", shape=None), tensor("i", T.INT64, None)],
        [const("k", [5])],
    )
    assert check_tensorrt_support(ok).ok


def test_scatter_reduction_cumsum_axis_unsupported_op_and_types():
    nodes = [
        h.make_node("ScatterND", ["x", "idx", "upd"], ["s"], name="scatter_add", reduction="add"),
        h.make_node("CumSum", ["x", "axis"], ["c"], name="cumsum_runtime_axis"),
        h.make_node("Unique", ["x"], ["u"], name="unique"),
        h.make_node("NonZero", ["ids"], ["nz"], name="nonzero_of_int64"),
        h.make_node("Gelu", ["x"], ["g"], name="custom", domain="com.example"),
        h.make_node("RandomNormalLike", ["x"], ["r"], name="seeded", seed=1.0),
    ]
    inputs = [
        tensor("x"),
        tensor("idx", T.INT64, (1, 1)),
        tensor("upd", shape=(1, 8)),
        tensor("axis", T.INT64, (1,)),
        tensor("ids", T.INT64, (4,)),
    ]
    outputs = [tensor(n, shape=None) for n in ("s", "c", "u", "g", "r")] + [tensor("nz", T.INT64, None)]
    report = check_tensorrt_support(model(nodes, inputs, outputs))
    errors = {f.node: f.reason for f in report.errors}
    assert "reduction" in errors["scatter_add"] and "'add'" in errors["scatter_add"]
    assert "axis" in errors["cumsum_runtime_axis"] and "run time" in errors["cumsum_runtime_axis"]
    assert "not supported" in errors["unique"]
    assert "INT64" in errors["nonzero_of_int64"]
    assert "plugin" in errors["custom"]
    assert "seeded" not in errors and any(f.node == "seeded" and "seed" in f.reason for f in report.warnings)
    with pytest.raises(UnsupportedGraphError, match="scatter_add"):
        report.raise_if_unsupported()


def test_rank0_input_opset_and_subgraph_nodes():
    then_branch = h.make_graph(
        [h.make_node("TopK", ["x", "k"], ["v", "i"], name="topk_in_branch")],
        "then",
        [],
        [tensor("v", shape=None)],
        [const("k", [4000])],
    )
    else_branch = h.make_graph(
        [h.make_node("Identity", ["x"], ["v"], name="same_name")], "else", [], [tensor("v", shape=None)]
    )
    m = model(
        [h.make_node("If", ["flag"], ["y"], name="branchy", then_branch=then_branch, else_branch=else_branch)],
        [tensor("x", shape=(2, 5000)), tensor("flag", T.BOOL, ())],
        [tensor("y", shape=None)],
        opset=25,
    )
    report = check_tensorrt_support(m)
    by_node = {f.node: f for f in report.errors}
    assert "Triton" in by_node["(input flag)"].reason
    assert "opset 25" in by_node["(model)"].reason
    assert by_node["topk_in_branch"].graph == "main/branchy.then_branch"
    assert "different names" in by_node["branchy"].reason  # both branches output 'v'


def test_the_real_parser_agrees_where_it_can_be_asked():
    """TensorRT for RTX's own parser (on CPU) refuses what the table refuses."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install -e '.[rtx]')")
    m = model(
        [h.make_node("ScatterND", ["x", "idx", "upd"], ["s"], name="scatter_add", reduction="add")],
        [tensor("x"), tensor("idx", T.INT64, (1, 1)), tensor("upd", shape=(1, 8))],
        [tensor("s")],
    )
    assert "scatter_add" in errors_of(m)
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert not parser.parse(m.SerializeToString())
    assert parser.get_error(0).node_name() == "scatter_add"


def test_amendments_hold_for_the_pinned_parser(tmp_path):
    """Each amendment to the published matrix (an op taking more types than it lists) is built by the
    real parser and builder of TensorRT for RTX, so a new pinned version that drops it fails here."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install -e '.[rtx]')")
    from aim.runtime.tensorrt import build_engine

    onnx_types = {"INT32": T.INT32, "INT64": T.INT64, "FP16": T.FLOAT16, "BOOL": T.BOOL}
    for amendment in load_table()["amendments"]:
        assert amendment["op"] == "CumSum"  # the only kind of graph built here; add one per new amendment
        for type_name in amendment["add_types"]:
            dtype = onnx_types[type_name]
            m = model(
                [h.make_node("CumSum", ["x", "axis"], ["y"], name="cumsum")],
                [tensor("x", dtype, ("b", 8))],
                [tensor("y", dtype, ("b", 8))],
                [const("axis", 1)],
            )
            assert check_tensorrt_support(m).ok
            onnx.save(m, str(tmp_path / "cumsum.onnx"))
            result = build_engine(
                tmp_path / "cumsum.onnx",
                tmp_path / "cumsum.plan",
                "tensorrt-rtx",
                {"x": {"min": [1, 8], "opt": [2, 8], "max": [4, 8]}},
            )
            assert result.bytes > 0 and result.io_types["y"]["dtype"] == type_name


def nested_if_model():
    def value(name):
        return tensor(name, shape=None)

    inner_then = h.make_graph([h.make_node("Abs", ["x"], ["a"], name="abs")], "inner_then", [], [value("a")])
    inner_else = h.make_graph([h.make_node("Neg", ["x"], ["b"], name="neg")], "inner_else", [], [value("b")])
    outer_then = h.make_graph(
        [h.make_node("If", ["small"], ["o1"], name="inner_if", then_branch=inner_then, else_branch=inner_else)],
        "outer_then",
        [],
        [value("o1")],
    )
    outer_else = h.make_graph([h.make_node("Identity", ["x"], ["o2"], name="copy")], "outer_else", [], [value("o2")])
    nodes = [
        h.make_node("ReduceMax", ["x"], ["m"], name="max", keepdims=0),
        h.make_node("Greater", ["m", "zero"], ["big"], name="big"),
        h.make_node("Less", ["m", "zero"], ["small"], name="small"),
        h.make_node("If", ["big"], ["y"], name="outer_if", then_branch=outer_then, else_branch=outer_else),
    ]
    return model(nodes, [tensor("x", shape=("b", 8))], [tensor("y", shape=("b", 8))], [const("zero", 0.0, np.float32)])


def test_backend_differences_nonzero_and_nested_if():
    """TensorRT for RTX has no NonZero (a plugin) and cannot build an If inside an If; TensorRT can."""
    nonzero = model(
        [h.make_node("NonZero", ["x"], ["nz"], name="nonzero")], [tensor("x")], [tensor("nz", T.INT64, None)]
    )
    assert check_tensorrt_support(nonzero, backend="tensorrt").ok
    assert (
        "plugin"
        in {f.node: f.reason for f in check_tensorrt_support(nonzero, backend="tensorrt-rtx").errors}["nonzero"]
    )
    nested = nested_if_model()
    assert check_tensorrt_support(nested, backend="tensorrt").ok
    rtx = {f.node: f.reason for f in check_tensorrt_support(nested, backend="tensorrt-rtx").errors}
    assert list(rtx) == ["outer_if"] and "inner_if" in rtx["outer_if"]
    with pytest.raises(ValueError, match="tensorrt-rtx"):
        check_tensorrt_support(nested, backend="tensorflow")


def test_backend_differences_hold_for_the_pinned_rtx(tmp_path):
    """The real TensorRT for RTX refuses both graphs, as its table entry says."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install -e '.[rtx]')")
    from aim.runtime.tensorrt import EngineBuildError, build_engine

    nonzero = model(
        [h.make_node("NonZero", ["x"], ["nz"], name="nonzero")],
        [tensor("x", shape=("b", 8))],
        [tensor("nz", T.INT64, None)],
    )
    for name, m, match in (("nonzero", nonzero, "NonZero"), ("nested", nested_if_model(), "could not build")):
        onnx.save(m, str(tmp_path / f"{name}.onnx"))
        with pytest.raises(EngineBuildError, match=match):
            build_engine(
                tmp_path / f"{name}.onnx",
                tmp_path / f"{name}.plan",
                "tensorrt-rtx",
                {"x": {"min": [1, 8], "opt": [2, 8], "max": [4, 8]}},
            )
        assert not (tmp_path / f"{name}.plan").exists()


def test_a_failed_shape_inference_is_said_not_swallowed():
    """Shapes that contradict each other make shape inference fail: the ops are still checked, but the
    report says that the element types were not, instead of reporting 'all supported' silently."""
    m = model(
        [h.make_node("MatMul", ["a", "b"], ["c"], name="mismatched")],
        [tensor("a", shape=(2, 3)), tensor("b", shape=(4, 5))],
        [tensor("c", shape=(2, 5))],
    )
    report = check_tensorrt_support(m)
    (finding,) = [f for f in report.warnings if f.op == "shape inference"]
    assert "NOT checked" in finding.reason and "infer_shapes" in finding.reason
    assert "warning" in report.summary() and "NOT checked" in report.summary()
    good = model(
        [h.make_node("MatMul", ["a", "b"], ["c"], name="fine")],
        [tensor("a", shape=(2, 3)), tensor("b", shape=(3, 5))],
        [tensor("c", shape=(2, 5))],
    )
    assert not [f for f in check_tensorrt_support(good).findings if f.op == "shape inference"]
