"""The redistribution pass on graphs built by hand, checked against its PyTorch twin."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from aim.contract import (
    FOCUS,
    MAX_STRENGTH,
    NOISE_FOCUS,
    NOISE_METHODS,
    NOISE_UTILITY,
    PREFIX,
    UTILITY,
    check_modulation,
    focus_vector,
)
from aim.errors import InvalidGraphError, InvalidInputError
from aim.graph_passes.io import load_graph, save_onnx
from aim.graph_passes.modulate import modulate_file
from aim.graph_passes.redistribution import add_redistribution, redistribute_torch
from tests.conftest import tiny_classifier


def identity_model(path, dims, dtype=TensorProto.FLOAT):
    """logits = Identity(x): the pass's output is then exactly the redistribution of the input."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("x", dtype, dims)],
        [helper.make_tensor_value_info("logits", dtype, dims)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def all_nodes(graph):
    """Nodes of a graph and of its If branches, recursively."""
    for node in graph.nodes:
        yield node
        for sub in node.subgraphs():
            yield from all_nodes(sub)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "dims, shape, class_axis",
    [
        (["batch", 7], (3, 7), 1),  # classification [B, C]
        (["batch", 5, "h", "w"], (2, 5, 4, 6), 1),  # segmentation [B, C, H, W]
        (["batch", "seq", 11], (2, 3, 11), -1),  # language model [B, T, V]
    ],
)
def test_graph_and_torch_twin_agree_bit_for_bit(tmp_path, dims, shape, class_axis):
    source = identity_model(tmp_path / "identity.onnx", dims)
    target = modulate_file(source, tmp_path / "verify.onnx", "logits", class_axis, flavour="verification")
    rng = np.random.default_rng(0)
    batch, classes = shape[0], shape[class_axis]
    feed = {
        "x": rng.normal(size=shape).astype(np.float32) * 5,
        UTILITY: rng.uniform(0, 4, size=batch).astype(np.float32),
        FOCUS: rng.normal(size=(batch, classes)).astype(np.float32) * 3,
        NOISE_UTILITY: rng.normal(size=shape).astype(np.float32),
        NOISE_FOCUS: rng.normal(size=shape).astype(np.float32),
    }
    (out,) = session(target).run(None, feed)
    reference = redistribute_torch(
        *(torch.from_numpy(feed[k]) for k in ("x", UTILITY, FOCUS, NOISE_UTILITY, NOISE_FOCUS)), class_axis=class_axis
    ).numpy()
    # Same FP32 operations in the same order: IEEE arithmetic gives the same bits.
    np.testing.assert_array_equal(out, reference)
    # And the formula itself, written out independently with numpy broadcasting.
    axis = class_axis % len(shape)
    focus_shape = [batch if a == 0 else classes if a == axis else 1 for a in range(len(shape))]
    expected = (
        feed["x"]
        + feed[UTILITY].reshape([batch] + [1] * (len(shape) - 1)) * feed[NOISE_UTILITY]
        + feed[FOCUS].reshape(focus_shape) * np.abs(feed[NOISE_FOCUS])
    )
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_pass_on_hand_made_classifier(tmp_path):
    source = tiny_classifier(tmp_path / "classifier.onnx")
    production = modulate_file(source, tmp_path / "production.onnx", "scores", 1)
    graph = load_graph(production)
    inputs = {t.name: t for t in graph.inputs}
    outputs = {t.name: t for t in graph.outputs}
    # The logits keep their name, shape and type; the other output is untouched.
    assert list(outputs) == ["scores", "probabilities"]
    assert outputs["scores"].dtype == np.float32 and outputs["scores"].shape == ["batch", 5]
    assert inputs[UTILITY].shape == ["batch"] and inputs[FOCUS].shape == ["batch", 5]
    assert inputs[UTILITY].dtype == np.float32 and inputs[FOCUS].dtype == np.float32
    new_nodes = [n for n in graph.nodes if n.name not in ("matmul", "add", "softmax")]
    assert new_nodes and all(n.name.startswith(PREFIX + "/") for n in new_nodes)
    ops = [n.op for n in all_nodes(graph)]
    # One random node serves both noises: two would get correlated seeds in ONNX Runtime.
    assert ops.count("RandomUniformLike") == 1 and ops.count("RandomNormalLike") == 0
    assert [n.op for n in graph.nodes if n.outputs[0].name == "scores"] == ["If"]  # the skip

    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    bare_scores, bare_probabilities = session(source).run(None, {"x": x})
    run = session(production)
    zero = {"x": x, UTILITY: np.zeros(4, np.float32), FOCUS: np.zeros((4, 5), np.float32)}
    scores, probabilities = run.run(None, zero)
    assert np.array_equal(scores, bare_scores)  # utility 0, focus 0: bit for bit
    assert np.array_equal(probabilities, bare_probabilities)  # the softmax branch is not modulated
    noisy = dict(zero, **{UTILITY: np.array([0, 3, 0, 3], np.float32)})
    scores, _ = run.run(None, noisy)
    assert np.array_equal(scores[[0, 2]], bare_scores[[0, 2]])
    assert np.all(scores[[1, 3]] != bare_scores[[1, 3]])


def test_fp16_logits_are_modulated_in_fp32_and_keep_their_type(tmp_path):
    source = tiny_classifier(tmp_path / "fp16.onnx", dtype=TensorProto.FLOAT16)
    target = modulate_file(source, tmp_path / "verify.onnx", "scores", 1, flavour="verification")
    graph = load_graph(target)
    assert {t.name: t.dtype for t in graph.outputs}["scores"] == np.float16
    assert {t.name: t.dtype for t in graph.inputs}[NOISE_UTILITY] == np.float32
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 6)).astype(np.float16)
    feed = {
        "x": x,
        UTILITY: np.array([0, 1, 2], np.float32),
        FOCUS: rng.normal(size=(3, 5)).astype(np.float32),
        NOISE_UTILITY: rng.normal(size=(3, 5)).astype(np.float32),
        NOISE_FOCUS: rng.normal(size=(3, 5)).astype(np.float32),
    }
    feed[FOCUS][0] = 0.0
    out = session(target).run(None, feed)[0]
    bare = session(source).run(None, {"x": x})[0]
    assert out.dtype == np.float16
    assert np.array_equal(out[0], bare[0])
    reference = redistribute_torch(
        torch.from_numpy(bare), *(torch.from_numpy(feed[k]) for k in (UTILITY, FOCUS, NOISE_UTILITY, NOISE_FOCUS))
    )
    assert reference.dtype == torch.float16
    # Both compute in FP32 and round once to FP16; the two FP32->FP16 converters may round the last
    # bit differently, so they agree to one FP16 ulp (2**-10 relative).
    np.testing.assert_allclose(out.astype(np.float32), reference.float().numpy(), rtol=2**-10, atol=2**-24)


def test_missing_logits_output_names_the_outputs(tmp_path):
    source = tiny_classifier(tmp_path / "classifier.onnx")
    with pytest.raises(InvalidGraphError, match=r"no output named 'logits'.*\['probabilities', 'scores'\]"):
        modulate_file(source, tmp_path / "out.onnx", "logits", 1)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("axis", [0, 2, -3, 5])
def test_class_axis_out_of_range(tmp_path, axis):
    source = tiny_classifier(tmp_path / "classifier.onnx")
    with pytest.raises(InvalidGraphError, match=f"class axis {axis} is out of range"):
        modulate_file(source, tmp_path / "out.onnx", "scores", axis)
    assert not (tmp_path / "out.onnx").exists()


def test_dynamic_class_count_is_refused(tmp_path):
    source = identity_model(tmp_path / "dynamic.onnx", ["batch", "classes"])
    with pytest.raises(InvalidGraphError, match="no static size"):
        modulate_file(source, tmp_path / "out.onnx", "logits", 1)


def test_modulating_twice_is_refused(tmp_path):
    source = tiny_classifier(tmp_path / "classifier.onnx")
    once = modulate_file(source, tmp_path / "once.onnx", "scores", 1)
    with pytest.raises(InvalidGraphError, match="modulated already"):
        modulate_file(once, tmp_path / "twice.onnx", "scores", 1)


def test_corrupt_onnx_file(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07this is not a protobuf\xff\xfe" * 10)
    with pytest.raises(InvalidGraphError, match="corrupt.onnx"):
        modulate_file(corrupt, tmp_path / "out.onnx", "logits", 1)
    truncated = tmp_path / "truncated.onnx"
    whole = tiny_classifier(tmp_path / "whole.onnx").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InvalidGraphError, match="truncated.onnx"):
        modulate_file(truncated, tmp_path / "out.onnx", "scores", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.onnx", "truncated.onnx", "whole.onnx"]


def test_old_opset_is_upgraded(tmp_path):
    source = tiny_classifier(tmp_path / "classifier.onnx")
    model = onnx.load(str(source))
    model.opset_import[0].version = 11
    save_onnx(model, tmp_path / "old.onnx")
    target = modulate_file(tmp_path / "old.onnx", tmp_path / "out.onnx", "scores", 1)
    assert onnx.load(str(target)).opset_import[0].version >= 15


def test_check_modulation_broadcasts_and_refuses_bad_values():
    utility, focus = check_modulation(1.5, [1.0, 0.0, -2.0], batch=2, num_classes=3)
    assert utility.tolist() == [1.5, 1.5] and focus.shape == (2, 3) and focus[1, 2] == -2.0
    assert check_modulation([0, 2], None, 2, 3)[1].tolist() == [[0, 0, 0], [0, 0, 0]]
    for bad, message in [
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (-0.5, r"\[0, 10000\]"),
        (2e4, r"\[0, 10000\]"),
        ([1, 2, 3], "one value per sample"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            check_modulation(bad, None, 2, 3)
    with pytest.raises(InvalidInputError, match=r"one value per class \(3\).*got shape \[4\]"):
        check_modulation(0.0, [1, 2, 3, 4], 2, 3)
    with pytest.raises(InvalidInputError, match="finite"):
        check_modulation(0.0, [1, float("nan"), 3], 2, 3)
    with pytest.raises(InvalidInputError, match="focus strengths must lie in"):
        check_modulation(0.0, [1, -1e5, 3], 2, 3)


def test_focus_vector():
    assert focus_vector(4, boost={1: 2.0}, suppress={3: 5.0}).tolist() == [0, 2, 0, -5]
    with pytest.raises(InvalidInputError, match="class 4 is out of range"):
        focus_vector(4, boost={4: 1.0})
    with pytest.raises(InvalidInputError, match=r"must lie in \[0, 10000\]"):
        focus_vector(4, suppress={0: -1.0})


def test_unknown_flavour():
    graph = gs.Graph()
    with pytest.raises(ValueError, match="flavour"):
        add_redistribution(graph, flavour="debug")


def verification_feed(rng, shape, class_axis=1):
    batch, classes = shape[0], shape[class_axis]
    return {
        "x": rng.normal(size=shape).astype(np.float32) * 5,
        UTILITY: rng.uniform(0, 4, size=batch).astype(np.float32),
        FOCUS: rng.normal(size=(batch, classes)).astype(np.float32) * 3,
        NOISE_UTILITY: rng.normal(size=shape).astype(np.float32),
        NOISE_FOCUS: rng.normal(size=shape).astype(np.float32),
    }


def twin(feed, class_axis=1):
    tensors = (
        torch.from_numpy(np.ascontiguousarray(feed[k])) for k in ("x", UTILITY, FOCUS, NOISE_UTILITY, NOISE_FOCUS)
    )
    return redistribute_torch(*tensors, class_axis=class_axis).numpy()


def test_sparse_focus_and_mixed_utility_agree_with_the_twin(tmp_path):
    """Focus on a few classes only (the sparse path) and utility 0 on some rows."""
    source = identity_model(tmp_path / "identity.onnx", ["batch", 9, "h", "w"])
    target = session(modulate_file(source, tmp_path / "verify.onnx", "logits", 1, flavour="verification"))
    rng = np.random.default_rng(3)
    feed = verification_feed(rng, (3, 9, 4, 5))
    feed[UTILITY][1] = 0.0
    feed[FOCUS][:] = 0.0
    feed[FOCUS][0, 2], feed[FOCUS][2, 7], feed[FOCUS][1, 7] = 3.0, -2.0, 1.5
    (out,) = target.run(None, feed)
    np.testing.assert_array_equal(out, twin(feed))
    # Row 1: utility 0, focus only on class 7: every other class is the bare logit, bit for bit.
    untouched = [c for c in range(9) if c != 7]
    np.testing.assert_array_equal(out[1, untouched], feed["x"][1, untouched])
    expected = feed["x"][1, 7] + 1.5 * np.abs(feed[NOISE_FOCUS][1, 7])
    np.testing.assert_allclose(out[1, 7], expected, rtol=1e-6)
    # Focus only: no class other than 2 and 7 moves in any row with utility 0.
    feed[UTILITY][:] = 0.0
    (out,) = target.run(None, feed)
    np.testing.assert_array_equal(out[:, [0, 1, 3, 4, 5, 6, 8]], feed["x"][:, [0, 1, 3, 4, 5, 6, 8]])


@pytest.mark.parametrize("knob", [UTILITY, FOCUS])
def test_nan_negative_and_infinite_knobs_are_sanitised_in_the_graph(tmp_path, knob):
    """Clients that bypass the Python checks (e.g. through Triton) cannot make NaN or inf logits:
    a NaN utility counts as MAX_STRENGTH (fail closed, never the bare model), a NaN focus as 0, a negative
    utility as its magnitude, +-inf as +-MAX_STRENGTH."""
    source = identity_model(tmp_path / "identity.onnx", ["batch", 6])
    target = session(modulate_file(source, tmp_path / "verify.onnx", "logits", 1, flavour="verification"))
    rng = np.random.default_rng(4)
    feed = verification_feed(rng, (4, 6))
    feed[UTILITY][:] = 0.0
    feed[FOCUS][:] = 0.0

    def run(values):
        f = dict(feed)
        f[knob] = (
            np.array(values, np.float32) if knob == UTILITY else np.tile(np.array(values, np.float32)[:, None], (1, 6))
        )
        return target.run(None, f)[0], twin(f)

    bad, reference = run([np.nan, -2.0, np.inf, -np.inf])
    good, _ = run(
        [
            MAX_STRENGTH if knob == UTILITY else 0.0,
            2.0 if knob == UTILITY else -2.0,
            MAX_STRENGTH,
            MAX_STRENGTH if knob == UTILITY else -MAX_STRENGTH,
        ]
    )
    assert np.all(np.isfinite(bad))
    np.testing.assert_array_equal(bad, good)
    np.testing.assert_array_equal(bad, reference)  # the twin applies the same rule
    if knob == UTILITY:  # fail closed: a NaN utility never returns the bare logits
        assert not np.array_equal(bad[0], feed["x"][0])
    else:
        np.testing.assert_array_equal(bad[0], feed["x"][0])  # a NaN focus is no focus


def test_focused_classes_without_nonzero_or_topk(tmp_path):
    """The index compaction used instead of NonZero (absent in TensorRT for RTX) and TopK (K <= 3840):
    the classes any row marks, in order, whether no row, one or several rows mark a class."""
    import onnx_graphsurgeon as gs

    from aim.graph_passes.ops import GraphOps

    classes = 5000  # more than TensorRT's TopK limit
    graph = gs.Graph(opset=17)
    focusing = gs.Variable("focusing", dtype=np.float32, shape=["batch", classes])
    graph.inputs = [focusing]
    ops = GraphOps(graph, np.float32, classes)
    out = ops.focused(focusing)
    out.shape = ["k"]
    graph.outputs = [out]
    path = save_onnx(graph, tmp_path / "focused.onnx")
    run = session(path)
    rng = np.random.default_rng(5)
    for rows in (1, 3):
        for chosen in (0, 1, 7, 4000, classes):
            values = np.zeros((rows, classes), np.float32)
            for row in range(rows):  # rows that overlap (3 x 4000 of 5000) or not
                values[row, rng.choice(classes, size=chosen, replace=False)] = 1.0
            (indices,) = run.run(None, {"focusing": values})
            np.testing.assert_array_equal(indices, np.flatnonzero(values.any(axis=0)))


def test_skip_branch_computes_the_bare_logits_itself(tmp_path):
    """When nothing else reads the logits, their producer moves into the If's branches, so the
    all-zero request writes the bare logits straight into the output (benchmark P1a)."""
    source = identity_model(tmp_path / "identity.onnx", ["batch", 4])
    graph = load_graph(modulate_file(source, tmp_path / "production.onnx", "logits", 1))
    (if_node,) = [n for n in graph.nodes if n.outputs[0].name == "logits"]
    assert if_node.op == "If" and not [n for n in graph.nodes if n.op == "Identity"]
    skip = if_node.attrs["else_branch"]
    assert [n.op for n in skip.nodes] == ["Identity"] and skip.nodes[0].inputs[0].name == "x"


def seeded_session(path, seed: int):
    ort.set_seed(seed)  # before the session exists: ONNX Runtime seeds only sessions made after it
    return session(path)


@pytest.mark.parametrize("method", NOISE_METHODS)
def test_production_noise_is_standard_normal_and_focus_independent(tmp_path, method):
    """One draw for both noises, on an odd class count (Box-Muller's last pair is cut). Seeded before
    the session; each scipy test rejects at 1e-7 on >= 20,000 values (the checker's ALPHA)."""
    from scipy import stats

    source = identity_model(tmp_path / "identity.onnx", ["batch", 1001])
    graph = add_redistribution(load_graph(source), "logits", 1, noise=method)
    run = seeded_session(save_onnx(graph, tmp_path / "production.onnx"), 21)
    x = np.zeros((8, 1001), np.float32)
    focus = np.zeros((8, 1001), np.float32)
    focus[:, 1::2] = 1.0  # 500 classes, n2 only for them
    draws = [run.run(None, {"x": x, UTILITY: np.ones(8, np.float32), FOCUS: focus})[0] for _ in range(6)]
    noise = np.stack(draws)
    plain = noise[:, :, 0::2].ravel()  # n1 only
    both = noise[:, :, 1::2].ravel()  # n1 + |n2|, independent: sqrt(2) * SkewNormal(1)
    assert plain.size >= 20_000 and both.size >= 20_000
    assert stats.kstest(plain, stats.norm.cdf).pvalue > 1e-7
    assert stats.kstest(both, stats.skewnorm(1.0, scale=np.sqrt(2.0)).cdf).pvalue > 1e-7
    # Fresh draws every run, and no element repeats another row's value.
    assert np.mean(draws[0] != draws[1]) > 0.999
    assert np.unique(noise[0]).size > 0.999 * noise[0].size


@pytest.mark.parametrize("method", NOISE_METHODS)
def test_focus_noise_is_not_a_neighbours_utility_noise(tmp_path, method):
    """Cross-class and cross-row independence, on enough pairs to see a correlation of 0.05.

    Utility 1 everywhere, focus 4 on a checkerboard of (row, class): a focused element is n1 + 4|n2|,
    its four neighbours (class +-1, row +-1) are n1 alone. Were n2 drawn from a neighbour's n1 (a
    shifted stream), scipy's Pearson r between focused elements and their neighbours' |n1| would be
    ~0.92; a dependence r between |n2| and a neighbour's |n1| shows as 0.92 r. With n >= 200,000 pairs
    per neighbour, independent noises keep |r| sqrt(n) below 5.6 (all four: false alarm < 1e-7) and
    r = 0.05 gives 0.046 sqrt(n) >= 20 (never missed)."""
    from scipy import stats

    source = identity_model(tmp_path / "identity.onnx", ["batch", 1001])
    graph = add_redistribution(load_graph(source), "logits", 1, noise=method)
    run = seeded_session(save_onnx(graph, tmp_path / "production.onnx"), 22)
    rows, classes = 64, 1001
    focused = (np.arange(rows)[:, None] + np.arange(classes)[None, :]) % 2 == 1
    feed = {
        "x": np.zeros((rows, classes), np.float32),
        UTILITY: np.ones(rows, np.float32),
        FOCUS: np.where(focused, 4.0, 0.0).astype(np.float32),
    }
    noise = np.stack([run.run(None, feed)[0] for _ in range(7)])  # [runs, rows, classes]
    threshold = stats.norm.isf(1e-7 / 4 / 2)
    for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        here = noise[:, max(0, -dr) : rows - max(0, dr), max(0, -dc) : classes - max(0, dc)]
        there = noise[:, max(0, dr) : rows + min(0, dr) or None, max(0, dc) : classes + min(0, dc) or None]
        chosen = focused[max(0, -dr) : rows - max(0, dr), max(0, -dc) : classes - max(0, dc)]
        a, b = here[:, chosen].ravel(), np.abs(there[:, chosen].ravel())
        assert a.size >= 200_000
        r = stats.pearsonr(a, b).statistic
        assert abs(r) * np.sqrt(a.size) < threshold, f"offset {(dr, dc)}: r = {r:.4f} over {a.size} pairs"
        assert (threshold + stats.norm.isf(1e-6)) / np.sqrt(a.size) < 0.92 * 0.05  # r = 0.05 would be seen


def poisoned(path, target):
    """The graph with every random node replaced by 0 / 0 over its shape: NaN noise, which turns
    every logit it touches into NaN (0 * NaN = NaN), so any run that draws noise shows it."""
    graph = load_graph(path)
    randoms = [node for node in all_nodes(graph) if node.op.startswith("Random")]
    assert len(randoms) == 1
    for node in randoms:
        node.op, node.attrs, node.inputs = "Div", {}, [node.inputs[0], node.inputs[0]]
    return save_onnx(graph, target)


@pytest.mark.parametrize("method", NOISE_METHODS)
@pytest.mark.parametrize("hand_made", ["identity", "classifier"])
def test_premium_tier_draws_no_noise(tmp_path, method, hand_made):
    """Utility 0 and focus 0 for the whole batch take the If's skip branch: no noise is drawn at all
    (benchmark P1a's premium tier). With NaN noise in the graph, that request still returns the bare
    logits bit for bit, while any request that asks for noise (even one row at utility 0.5, or focus on
    one class) comes back NaN: the noise branch ran, and 0 * noise did not hide it."""
    if hand_made == "identity":
        source, logits, feed = (
            identity_model(tmp_path / "bare.onnx", ["batch", 6]),
            "logits",
            {"x": np.arange(18, dtype=np.float32).reshape(3, 6)},
        )
    else:
        source, logits, feed = (
            tiny_classifier(tmp_path / "bare.onnx", classes=6),
            "scores",
            {"x": np.ones((3, 6), np.float32)},
        )
    graph = add_redistribution(load_graph(source), logits, 1, noise=method)
    run = session(poisoned(save_onnx(graph, tmp_path / "production.onnx"), tmp_path / "poisoned.onnx"))
    bare = session(source).run(None, feed)[0]
    zero = {**feed, UTILITY: np.zeros(3, np.float32), FOCUS: np.zeros((3, 6), np.float32)}
    np.testing.assert_array_equal(run.run(None, zero)[0], bare)
    some = dict(zero, **{UTILITY: np.array([0.0, 0.5, 0.0], np.float32)})
    assert np.all(np.isnan(run.run(None, some)[0]))
    focus = dict(zero, **{FOCUS: np.eye(3, 6, 2, dtype=np.float32)})
    assert np.all(np.isnan(run.run(None, focus)[0]))


def test_weights_are_not_moved_into_the_branches(tmp_path):
    """A classifier head's weights would be stored in both branches: such a producer stays outside."""
    weights = np.random.default_rng(6).normal(size=(256, 100)).astype(np.float32)  # 100 KB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 100])],
        initializer=[onnx.numpy_helper.from_array(weights, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "head.onnx"))
    target = modulate_file(tmp_path / "head.onnx", tmp_path / "production.onnx", "logits", 1)
    assert target.stat().st_size < 1.5 * weights.nbytes  # stored once
    modulated = load_graph(target)
    model_matmuls = [n.op for n in modulated.nodes if n.op == "MatMul" and not n.name.startswith(PREFIX + "/")]
    assert model_matmuls == ["MatMul"]  # still in the main graph
    x = np.random.default_rng(7).normal(size=(3, 256)).astype(np.float32)
    zero = {"x": x, UTILITY: np.zeros(3, np.float32), FOCUS: np.zeros((3, 100), np.float32)}
    bare = session(tmp_path / "head.onnx").run(None, {"x": x})[0]
    np.testing.assert_array_equal(session(target).run(None, zero)[0], bare)


def fp16_conv_classifier(path, classes: int = 10):
    """An FP16 model as `model.half()` exports it: Conv, Relu, GlobalAveragePool, Flatten, Gemm. ONNX
    Runtime's CPU provider has no FP16 kernels for most of these and runs the chain in FP32."""
    rng = np.random.default_rng(3)
    weights = [
        numpy_helper.from_array(rng.normal(size=shape).astype(np.float16), name)
        for name, shape in (
            ("conv.w", (8, 3, 3, 3)),
            ("conv.b", (8,)),
            ("head.w", (classes, 8)),
            ("head.b", (classes,)),
        )
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "conv.w", "conv.b"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
            helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
            helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "head.w", "head.b"], ["scores"], name="head", transB=1),
        ],
        "half",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT16, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT16, ["n", classes])],
        initializer=weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_fp16_model_keeps_its_logits_bit_for_bit_at_utility_0(tmp_path):
    """ONNX Runtime rounds an FP16 chain it runs in FP32 only where a tensor leaves it: moving the
    logits' producer into the If's branches rounded its inputs at the branch edge, and 32% of the
    logits came back off the bare model's (most by one FP16 ulp, some by up to 10)."""
    source = fp16_conv_classifier(tmp_path / "half.onnx")
    production = modulate_file(source, tmp_path / "half.mod.onnx", "scores", 1)
    x = np.random.default_rng(4).normal(size=(32, 3, 8, 8)).astype(np.float16)
    bare = session(source).run(None, {"image": x})[0]
    utility = np.zeros(32, np.float32)
    utility[1::2] = 2.0
    run = session(production)
    skipped = run.run(None, {"image": x, UTILITY: np.zeros(32, np.float32), FOCUS: np.zeros((32, 10), np.float32)})[0]
    mixed = run.run(None, {"image": x, UTILITY: utility, FOCUS: np.zeros((32, 10), np.float32)})[0]
    assert skipped.dtype == np.float16
    assert np.array_equal(skipped, bare)  # the skip branch
    assert np.array_equal(mixed[0::2], bare[0::2])  # utility-0 rows of a noisy batch
    assert np.all(mixed[1::2] != bare[1::2])
