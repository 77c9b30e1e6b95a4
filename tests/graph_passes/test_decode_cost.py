"""What the redistribution costs a request, counted in passes over the vocabulary, not timed (the suite
times nothing; docs/results.md has the times): ONNX Runtime's profiler records every node it ran with the
shapes of its outputs. Over a 49,152-token vocabulary each such pass costs a decode step 5-170 us, and a
135M model's step is ~30 ms: the passes a request without focus paid for the focused classes' ranks and
for the keyed noise's class hash were most of the 8% that `make bench` measured at utility 3."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from aim.contract import FOCUS, PREFIX, UTILITY
from aim.graph_passes.modulate import modulate_file
from aim.graph_passes.noise_key import NoiseKey

CLASSES = 2000  # a vocabulary; the batch below is 2 rows
KEY = NoiseKey(bytes(range(32)))


@pytest.fixture(scope="module", params=["fresh", "keyed"])
def engine(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])],
        "logits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", CLASSES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "bare.onnx"))
    key = KEY if request.param == "keyed" else None
    return modulate_file(folder / "bare.onnx", folder / "modulated.onnx", "logits", 1, key=key), folder


def subgraph_outputs(engine, utility: float, focused: list[int]) -> list[tuple[str, list[tuple[str, list[int]]]]]:
    """(op, [(dtype, shape)] of its outputs) of each redistribution node ONNX Runtime ran for one request
    of 2 rows, the classes `focused` boosted in the first."""
    path, folder = engine
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    focus = np.zeros((2, CLASSES), np.float32)
    focus[0, focused] = 2.0
    x = np.random.default_rng(0).normal(size=(2, CLASSES)).astype(np.float32)
    session.run(None, {"x": x, UTILITY: np.full(2, utility, np.float32), FOCUS: focus})
    events = json.loads(open(session.end_profiling()).read())
    return [
        (e["args"]["op_name"], [(t, shape) for out in e["args"]["output_type_shape"] for t, shape in out.items()])
        for e in events
        if e.get("cat") == "Node" and e["name"].startswith(PREFIX + "/") and e["name"].endswith("_kernel_time")
    ]


def vocabulary_passes(ran) -> list[str]:
    """The nodes that wrote at least a vocabulary's worth of values."""
    return sorted(op for op, outs in ran if sum(math.prod(shape) for _, shape in outs) >= CLASSES)


def vocabulary_indices(ran) -> list[str]:
    """The nodes that wrote a 1-D int64 tensor of half a vocabulary or more: per-class ranks or counters."""
    return sorted(op for op, outs in ran if any(t == "int64" and len(s) == 1 and s[0] >= CLASSES // 2 for t, s in outs))


def test_a_request_without_noise_or_focus_passes_over_the_vocabulary_only_to_find_so(engine):
    """Utility 0, no focus (the premium tier, which must cost next to nothing): |focus| > 0 as 1.0, then
    the If's copy of the bare logits. Before: 13 passes (sanitising the whole focus, the ranks)."""
    assert vocabulary_passes(subgraph_outputs(engine, 0.0, [])) == ["Abs", "Cast", "Greater", "If"]


def test_no_focused_class_no_rank_and_no_class_hash_per_request(engine):
    """With noise but no focus, nothing is computed per class index: the focused classes' ranks
    (CumSum, ScatterElements over C) run over one class, and the keyed noise's key-only class hash is a
    constant of the graph. Before: 4 such nodes fresh, 23 keyed."""
    assert vocabulary_indices(subgraph_outputs(engine, 3.0, [])) == []


def test_a_focused_class_pays_for_the_ranks(engine):
    """The other side: where a row focuses, the ranks do run over the vocabulary (else the test above
    could pass with a graph that never finds the focused classes)."""
    assert vocabulary_indices(subgraph_outputs(engine, 3.0, [5, 1500])) != []
