"""Maps (segmentation logits) are modulated block by block of the class axis (graph_passes/class_tiles.py):
no intermediate of the noisy branch is as large as the logits but the one random draw and the output,
the upsampling is done per block bit for bit, and the noise keeps its statistics."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from scipy import stats

from aim.contract import FOCUS, NOISE_FOCUS, NOISE_UTILITY, UTILITY
from aim.graph_passes.class_tiles import ClassTiles, class_tiles
from aim.graph_passes.io import load_graph, save_onnx
from aim.graph_passes.modulate import deployment_graphs
from aim.graph_passes.noise_key import KEY_BYTES, NoiseKey
from aim.graph_passes.redistribution import add_redistribution
from aim.runtime.onnxruntime import OnnxRuntimeEngine, has_maps
from tests.graph_passes.test_redistribution import identity_model
from tests.graph_passes.test_upsample import segmenter

CLASSES = 150  # SegFormer's ADE20K head: 15 tiles of 5 pairs
KEY = NoiseKey(bytes(range(KEY_BYTES)))


def test_blocks_cover_the_classes_once_in_pair_order():
    for classes in (1, 2, 3, 5, 19, 150, 151):
        tiles = ClassTiles(classes, 2)
        blocks = tiles.blocks()
        covered = sorted(c for start, stop in blocks for c in range(start, stop))
        assert covered == list(range(classes))
        # Pair p fills classes p and half + p: a tile's sine block follows its cosine block.
        assert blocks[:2] == [(0, min(2, tiles.half)), (tiles.half, min(tiles.half + 2, classes))][: len(blocks[:2])]
        assert tiles.in_class_order(blocks) == sorted(blocks)
    assert class_tiles(2, 1000) is None and class_tiles(3, 32000) is None  # rows and sequences: whole
    assert class_tiles(4, 2) is None  # one pair: nothing to tile


def full_size_outputs(path, feed, logits_bytes, tmp_path) -> list[str]:
    """The ops of the nodes that wrote a tensor at least as large as the logits, from ONNX Runtime's
    profile of one run (its output sizes, not its times)."""
    options = ort.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    events = json.loads(open(session.end_profiling()).read())
    return [
        event["args"]["op_name"]
        for event in events
        if event.get("cat") == "Node"
        and event["name"].endswith("_kernel_time")
        and event["args"]["op_name"] != "If"  # the branch's output, counted in the branch
        and int(event["args"].get("output_size", 0)) >= logits_bytes
    ]


@pytest.mark.parametrize("noise", ["box-muller", "normal", "keyed"])
def test_the_noisy_branch_holds_no_full_size_intermediate(tmp_path, noise):
    """Before, z + u * n1 over the whole map held a dozen logits-sized tensors (the draw, its halves,
    Box-Muller's terms, n1, the sum, the scatter's copy): SegFormer peaked at 2.6x the bare model."""
    bare = deployment_graphs(
        __import__("onnx").load(str(segmenter(tmp_path / "seg.onnx", CLASSES))), "logits", 1, "pixel_values"
    )["bare"]
    how = {"key": KEY} if noise == "keyed" else {"noise": noise}
    path = save_onnx(add_redistribution(bare, "logits", 1, **how), tmp_path / "modulated.onnx")
    batch, size = 2, 32
    focus = np.zeros((batch, CLASSES), np.float32)
    focus[:, [4, 80]] = 2.0
    feed = {
        "pixel_values": np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32),
        UTILITY: np.ones(batch, np.float32),
        FOCUS: focus,
    }
    logits_bytes = batch * CLASSES * size * size * 4
    written = full_size_outputs(path, feed, logits_bytes, tmp_path)
    expected = (
        ["Concat"] if noise == "keyed" else ["Random" + ("UniformLike" if noise == "box-muller" else "NormalLike")]
    )
    assert sorted(written) == sorted(expected + (["Concat"] if noise != "keyed" else []))


def test_per_block_upsampling_and_sparse_focus_are_the_formula_bit_for_bit(tmp_path):
    """The verification flavour on an upsampled map, focus on classes at the blocks' edges and in no
    block at all for some: numpy's z + u * n1 + f * |n2| over the bare graph's logits, bit for bit."""
    graphs = deployment_graphs(
        __import__("onnx").load(str(segmenter(tmp_path / "seg.onnx", CLASSES))), "logits", 1, "pixel_values"
    )
    run = {
        kind: ort.InferenceSession(
            str(save_onnx(graphs[kind], tmp_path / f"{kind}.onnx")), providers=["CPUExecutionProvider"]
        )
        for kind in ("bare", "verification")
    }
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 3, 24, 20)).astype(np.float32)
    shape = (3, CLASSES, 24, 20)
    focus = np.zeros((3, CLASSES), np.float32)
    focus[0, [0, 4, 5, 74, 75, 149]] = [3.0, -1.0, 2.0, 0.5, -4.0, 1.0]
    focus[2, 80] = 2.5
    feed = {
        "pixel_values": x,
        UTILITY: np.array([1.5, 0.0, 2.0], np.float32),
        FOCUS: focus,
        NOISE_UTILITY: rng.normal(size=shape).astype(np.float32),
        NOISE_FOCUS: rng.normal(size=shape).astype(np.float32),
    }
    (z,) = run["bare"].run(None, {"pixel_values": x})
    (out,) = run["verification"].run(None, feed)
    u = feed[UTILITY][:, None, None, None]
    expected = z + u * feed[NOISE_UTILITY]
    focused = np.flatnonzero(np.abs(focus).max(axis=0) > 0)
    expected[:, focused] += focus[:, focused, None, None] * np.abs(feed[NOISE_FOCUS][:, focused])
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[1], z[1])  # utility 0 and no focus on row 1: its bare logits


def test_fresh_noise_of_a_map_is_standard_normal_and_its_blocks_independent(tmp_path):
    """Every block's noise N(0, 1), cosine and sine of one pair uncorrelated, and the focus noise a
    draw of its own: scipy's KS and Pearson tests, each rejecting at 1e-7 (so the suite's false alarm
    rate is below 1e-6); a correlation of 0.05 between partners would show as z > 20."""
    source = identity_model(tmp_path / "identity.onnx", ["batch", CLASSES, "h", "w"])
    ort.set_seed(23)  # before the session: ONNX Runtime seeds only sessions made after it
    path = save_onnx(add_redistribution(load_graph(source), "logits", 1), tmp_path / "production.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch, h, w = 2, 16, 16
    focus = np.zeros((batch, CLASSES), np.float32)
    focus[:, 3] = 1.0
    feed = {"x": np.zeros((batch, CLASSES, h, w), np.float32), UTILITY: np.ones(batch, np.float32), FOCUS: focus}
    noise = np.concatenate([session.run(None, feed)[0] for _ in range(2)])  # [runs x rows, C, h, w]
    plain = np.delete(noise, 3, axis=1)
    assert stats.kstest(plain.ravel(), stats.norm.cdf).pvalue > 1e-7
    assert stats.kstest(noise[:, 3].ravel(), stats.skewnorm(1.0, scale=np.sqrt(2.0)).cdf).pvalue > 1e-7
    half = CLASSES // 2
    cosine, sine = noise[:, :half].ravel(), noise[:, half:].ravel()  # pair p: classes p and half + p
    limit = stats.norm.isf(1e-7 / 2)
    assert abs(stats.pearsonr(cosine, sine).statistic) * np.sqrt(cosine.size) < limit
    assert (limit + stats.norm.isf(1e-6)) / np.sqrt(cosine.size) < 0.05
    # Neighbouring blocks (classes 4 and 5 lie in two tiles) and the runs draw afresh.
    assert abs(stats.pearsonr(noise[:, 4].ravel(), noise[:, 5].ravel()).statistic) * np.sqrt(noise[:, 4].size) < limit
    assert np.mean(noise[:batch] != noise[batch:]) > 0.999


def test_the_engine_runs_maps_without_the_memory_pattern(tmp_path):
    """ONNX Runtime's memory pattern doubled what a map's graph holds beyond its outputs: an engine whose
    output is a map runs without it, rows and sequences with it (ONNX Runtime's default)."""
    maps = OnnxRuntimeEngine(identity_model(tmp_path / "map.onnx", ["batch", 5, "h", "w"]))
    rows = OnnxRuntimeEngine(identity_model(tmp_path / "rows.onnx", ["batch", "seq", 11]))
    assert has_maps(maps.session) and not has_maps(rows.session)
    assert maps.session.get_session_options().enable_mem_pattern is False
    assert rows.session.get_session_options().enable_mem_pattern is True
    maps.set_seed(1)  # a session made again keeps the engine's options
    assert maps.session.get_session_options().enable_mem_pattern is False
    forced = OnnxRuntimeEngine(tmp_path / "map.onnx", memory_pattern=True)  # the bench's "as a user runs it"
    assert forced.session.get_session_options().enable_mem_pattern is True


def test_a_decoders_kv_cache_is_not_a_map(tmp_path):
    """A decoder's `present.*` outputs have rank 4 like maps, but each step's are small: its engine keeps
    ONNX Runtime's memory pattern (without it a decode step ran 11% slower in `make bench`)."""
    import onnx
    from onnx import TensorProto, helper

    from aim.tasks.decoder_inputs import PRESENT

    cache = ["batch", 2, "total", 4]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"]), helper.make_node("Identity", ["past"], [f"{PRESENT}0.key"])],
        "decoder",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 11]),
            helper.make_tensor_value_info("past", TensorProto.FLOAT, cache),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 11]),
            helper.make_tensor_value_info(f"{PRESENT}0.key", TensorProto.FLOAT, cache),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "decoder.onnx"))
    decoder = OnnxRuntimeEngine(tmp_path / "decoder.onnx")
    assert not has_maps(decoder.session)
    assert decoder.session.get_session_options().enable_mem_pattern is True


def test_graphs_for_tensorrt_are_made_whole(tmp_path):
    """TensorRT plans its own memory, and its builder wanted more than its workspace for the blocks at
    the build profile's largest map (pipeline/steps.py asks for whole graphs for TensorRT backends)."""

    def resizes(tile_maps):
        seg = __import__("onnx").load(str(segmenter(tmp_path / "seg.onnx", CLASSES)))
        graph = deployment_graphs(seg, "logits", 1, "pixel_values", tile_maps=tile_maps)["production"]
        (region,) = [node for node in graph.nodes if node.op == "If"]
        return sum(node.op == "Resize" for node in region.attrs["then_branch"].nodes)

    assert resizes(True) == len(ClassTiles(CLASSES, 5).blocks()) == 30
    assert resizes(False) == 1
