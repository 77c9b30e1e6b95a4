"""Keyed noise (graph_passes.noise: SmoothKeyedNoise for rows [B, C], CellKeyedNoise where the logits
have positions): the same request gets the same answer, distinct requests draw independent N(0, 1)
noise, a slightly moved request nearly the same noise, and the ONNX graph agrees with its PyTorch twin.

The statistics are judged by scipy (KS) and by Pearson correlations with z-score limits, not by the
project's own checker; ONNX Runtime and PyTorch are the two independent interpreters of the one
statement."""

import os
import stat

import numpy as np
import onnxruntime as ort
import pytest
import torch
from scipy import stats

from aim.contract import FOCUS, UTILITY
from aim.graph_passes.io import load_graph, save_onnx
from aim.graph_passes.noise import CELL_WIDTH, DIGEST_STEP
from aim.graph_passes.noise_key import KEY_BYTES, PROJECTIONS, NoiseKey, NoiseKeyError
from aim.graph_passes.redistribution import add_redistribution, redistribute_torch
from aim.graph_passes.trt_support import check_tensorrt_support
from tests.graph_passes.test_redistribution import all_nodes, identity_model

KEY = NoiseKey(bytes(range(KEY_BYTES)))
Z_LIMIT = stats.norm.isf(1e-3 / 2)  # |r| sqrt(n) beyond this: correlated, at a false-alarm rate of 1e-3 per test
SHAPES = [
    (["batch", 7], (3, 7), 1),  # classification [B, C]
    (["batch", 5, "h", "w"], (2, 5, 4, 6), 1),  # segmentation [B, C, H, W]
    (["batch", "seq", 11], (2, 3, 11), -1),  # language model [B, T, V]
]


def keyed_session(tmp_path, dims, class_axis=1, key=KEY, name="keyed.onnx"):
    source = identity_model(tmp_path / f"identity-{name}", dims)
    path = save_onnx(add_redistribution(load_graph(source), "logits", class_axis, key=key), tmp_path / name)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path


def run(session, x, utility, focus=None):
    batch, classes = x.shape[0], session.get_inputs()[2].shape[1]
    focus = np.zeros((batch, classes), np.float32) if focus is None else np.asarray(focus, np.float32)
    return session.run(None, {"x": x, UTILITY: np.broadcast_to(np.float32(utility), (batch,)).copy(), FOCUS: focus})[0]


def correlation_z(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return np.corrcoef(a, b)[0, 1] * np.sqrt(a.size)


@pytest.mark.parametrize("dims, shape, class_axis", SHAPES)
def test_keyed_graph_and_torch_twin_agree(tmp_path, dims, shape, class_axis):
    session, _ = keyed_session(tmp_path, dims, class_axis)
    rng = np.random.default_rng(0)
    batch, classes = shape[0], shape[class_axis]
    x = rng.normal(size=shape).astype(np.float32) * 5
    utility = rng.uniform(0.5, 4, size=batch).astype(np.float32)
    focus = np.zeros((batch, classes), np.float32)
    focus[:, 1], focus[0, 2] = 3.0, -2.0
    out = run(session, x, utility, focus)
    twin = redistribute_torch(*map(torch.from_numpy, (x, utility, focus)), class_axis=class_axis, key=KEY).numpy()
    # The same integers on both sides; the float ops (log, cos, sin, the digest's matmul) may differ
    # in their last bits between ONNX Runtime's and PyTorch's kernels: ~1e-7 of the values here.
    np.testing.assert_allclose(out, twin, rtol=1e-6, atol=1e-5)
    other = redistribute_torch(
        *map(torch.from_numpy, (x, utility, focus)), class_axis=class_axis, key=NoiseKey(bytes(KEY_BYTES))
    ).numpy()
    assert np.mean(np.abs(other - twin) > 1e-3) > 0.95  # another key, another draw
    assert not np.array_equal(out, x) and np.array_equal(run(session, x, 0.0), x)  # utility 0, focus 0: exact


def test_same_request_same_answer_whatever_shares_its_batch(tmp_path):
    """A row alone, twice, in two sessions, after set_seed, and inside a batch whose other rows focus
    other classes: the same draw (the float math may move a last bit with the row's place in memory)."""
    session, path = keyed_session(tmp_path, ["batch", 5, "h", "w"])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 5, 6, 7)).astype(np.float32)
    focus = np.zeros((4, 5), np.float32)
    focus[1, 3] = 2.0  # the row under test focuses class 3 ...
    focus[[0, 2, 3], 0], focus[2, 4] = -3.0, 5.0  # ... its neighbours other classes
    utility = np.array([1.0, 2.0, 0.0, 3.0], np.float32)
    together = session.run(None, {"x": x, UTILITY: utility, FOCUS: focus})[0]
    ort.set_seed(123)  # random kernels' seeds do not reach keyed noise
    again = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    alone = [again.run(None, {"x": x[1:2], UTILITY: utility[1:2], FOCUS: focus[1:2]})[0] for _ in range(2)]
    assert np.array_equal(alone[0], alone[1])
    np.testing.assert_allclose(together[1:2], alone[0], rtol=1e-6, atol=1e-6)
    assert np.abs(together[1] - x[1]).max() > 0.5  # and the row is noisy: the comparison means something


def test_distinct_requests_draw_independent_standard_normal_noise(tmp_path):
    """Rows whose logits lie far apart (in units of sigma) get independent N(0, 1) noise: KS, mean and
    variance, and no correlation between rows, between classes or between Box-Muller's halves."""
    session, _ = keyed_session(tmp_path, ["batch", 10])
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(4000, 10)) * 30).astype(np.float32)  # RMS distance ~40 sigma between rows
    noise = (run(session, x, 1.0) - x).astype(np.float64)
    assert stats.kstest(noise.ravel(), "norm").pvalue > 1e-3
    assert abs(noise.mean()) < 4 / np.sqrt(noise.size) and abs(noise.var() - 1) < 4 * np.sqrt(2 / noise.size)
    for a, b in [
        (noise[:-1], noise[1:]),
        (noise[:, :-1], noise[:, 1:]),
        (noise[:, :5], noise[:, 5:]),
        (noise[:, :5] ** 2, noise[:, 5:] ** 2),
    ]:
        assert abs(correlation_z(a, b)) < Z_LIMIT
    # n1 + |n2| for independent n1, n2 is sqrt(2) SkewNormal(1).
    both = run(session, x, 1.0, np.ones((4000, 10), np.float32)) - x
    assert stats.kstest(both.ravel(), stats.skewnorm(1.0, scale=np.sqrt(2)).cdf).pvalue > 1e-3


def test_neighbouring_pixels_and_classes_are_uncorrelated(tmp_path):
    session, _ = keyed_session(tmp_path, ["batch", 6, "h", "w"])
    x = np.zeros((8, 6, 32, 32), np.float32)
    sigmas = 1.0 + np.arange(8, dtype=np.float32) / 16  # distinct tiers: distinct requests on equal logits
    noise = (
        session.run(None, {"x": x, UTILITY: sigmas, FOCUS: np.zeros((8, 6), np.float32)})[0]
        / sigmas[:, None, None, None]
    ).astype(np.float64)
    assert stats.kstest(noise.ravel(), "norm").pvalue > 1e-3
    for axis in (0, 1, 2, 3):
        size = noise.shape[axis]
        assert (
            abs(correlation_z(noise.take(range(size - 1), axis=axis), noise.take(range(1, size), axis=axis))) < Z_LIMIT
        ), axis


def test_perturbations_smaller_than_a_cell_keep_the_digest_draw(tmp_path):
    """Logits with positions (here one): moved by 1e-3 sigma (RMS) they keep their draw in more than 97.5% of rows;
    moved by 10 sigma they draw afresh. The first rate is the digest's: each of its PROJECTIONS
    coordinates moves by ~N(0, 1e-3 / DIGEST_STEP) cells and flips with probability 0.8 of that."""
    session, _ = keyed_session(tmp_path, ["batch", 50, 1])
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(2000, 50, 1)) * 5).astype(np.float32)
    sigma = 2.0
    noise = run(session, x, sigma) - x

    def fresh_share(moved):
        other = run(session, moved, sigma) - moved
        return float(np.mean(np.abs(other - noise).reshape(len(x), -1).max(1) > 1e-3))

    small = fresh_share(x + (rng.normal(size=x.shape) * 1e-3 * sigma).astype(np.float32))
    assert small < 0.025
    expected = PROJECTIONS * np.sqrt(2 / np.pi) * 1e-3 / DIGEST_STEP  # 0.0128
    assert abs(small - expected) < 4 * np.sqrt(expected / 2000)
    assert fresh_share(x + (rng.normal(size=x.shape) * 10 * sigma).astype(np.float32)) > 0.99


def kuhn_weights(points: np.ndarray) -> list[dict]:
    """Per row, {vertex: weight} of the simplex of Kuhn's triangulation holding each point [N, m], weights
    the barycentric coordinates over their norm: numpy's argsort, not the graph's comparisons."""
    corner = np.floor(points)
    fraction = points - corner
    found = []
    for c, f in zip(corner.astype(np.int64), fraction):
        order = np.argsort(-f, kind="stable")
        ordered = f[order]
        weights = np.concatenate([[1 - ordered[0]], ordered[:-1] - ordered[1:], [ordered[-1]]])
        vertex, row = c.copy(), {}
        for j, weight in enumerate(weights / np.linalg.norm(weights)):
            row[tuple(vertex)] = weight
            if j < len(order):
                vertex = vertex.copy()
                vertex[order[j]] += 1
        found.append(row)
    return found


def test_smooth_noise_correlates_as_the_simplex_weights_overlap(tmp_path):
    """Rows [B, C]: two requests' noise correlates as much as the weights of their simplices' shared
    vertices overlap, computed here from the key's projection and phase with numpy's own simplex; so a
    small move keeps most of the draw and a move of many cells none of it."""
    classes, sigma = 4000, 2.0
    session, _ = keyed_session(tmp_path, ["batch", classes])
    constants = KEY.constants(classes)
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(6, classes)) * 3).astype(np.float32)
    moves = [0.02, 0.1, 0.3, 1.0, 10.0]  # RMS, in units of sigma
    moved = np.stack([x + (rng.normal(size=x.shape) * m * sigma).astype(np.float32) for m in moves], axis=1)
    rows = np.concatenate([x[:, None], moved], axis=1).reshape(-1, classes)
    noise = (run(session, rows, sigma) - rows).reshape(6, len(moves) + 1, classes).astype(np.float64)

    def point(z):
        centred = z.astype(np.float64) - z.mean(axis=-1, keepdims=True)
        width = sigma * CELL_WIDTH * np.sqrt(classes)
        return centred @ constants.projection.astype(np.float64) / width + constants.offsets

    for i in range(6):
        simplices = kuhn_weights(point(rows.reshape(6, -1, classes)[i]))
        for k in range(1, len(moves) + 1):
            expected = sum(w * simplices[k].get(v, 0.0) for v, w in simplices[0].items())
            measured = np.corrcoef(noise[i, 0], noise[i, k])[0, 1]
            assert abs(measured - expected) < 5 * (1 - expected**2) / np.sqrt(classes) + 1e-3, (i, moves[k - 1])
    closest = np.corrcoef(noise[:, 0].ravel(), noise[:, 1].ravel())[0, 1]
    farthest = np.corrcoef(noise[:, 0].ravel(), noise[:, -1].ravel())[0, 1]
    assert closest > 0.97 and abs(farthest) < 5 / np.sqrt(noise[:, 0].size)


def test_smooth_noise_is_continuous_where_the_digest_jumps(tmp_path):
    """Along a straight path between two requests 3 sigma apart, the smooth noise moves by small steps
    (its largest is a few times the median); the digest of the same logits with a position axis jumps."""
    rng = np.random.default_rng(6)
    start, end = (rng.normal(size=(2, 20)) * 3).astype(np.float64)
    end = start + (end - start) / np.sqrt(np.mean((end - start) ** 2)) * 3 * 2.0
    path = (start + np.linspace(0, 1, 801)[:, None] * (end - start)).astype(np.float32)
    smooth, _ = keyed_session(tmp_path, ["batch", 20], name="smooth.onnx")
    cells, _ = keyed_session(tmp_path, ["batch", 20, 1], name="cells.onnx")
    steps = np.linalg.norm(np.diff(run(smooth, path, 2.0) - path, axis=0), axis=1)
    jumps = np.linalg.norm(np.diff((run(cells, path[..., None], 2.0)[..., 0] - path), axis=0), axis=1)
    assert steps.max() < 10 * np.median(steps) and steps.max() < 0.5
    assert jumps.max() > 2.0 and np.median(jumps) < 1e-5  # within a cell: only the rounding of z + noise moves


def test_another_tier_draws_afresh_and_focus_does_not_change_the_utility_noise(tmp_path):
    session, _ = keyed_session(tmp_path, ["batch", 10])
    x = (np.random.default_rng(4).normal(size=(500, 10)) * 30).astype(np.float32)  # 500 distinct requests
    low, high = ((run(session, x, s) - x) / s for s in (2.0, 2.001))
    assert np.mean(low != high) > 0.99 and abs(correlation_z(low, high)) < Z_LIMIT
    focus = np.zeros((500, 10), np.float32)
    focus[:, 4] = 3.0
    with_focus = run(session, x, 2.0, focus)
    without = run(session, x, 2.0)
    assert np.array_equal(np.delete(with_focus, 4, axis=1), np.delete(without, 4, axis=1))
    assert np.all(with_focus[:, 4] > without[:, 4])


@pytest.mark.parametrize("dims, shape, class_axis", SHAPES)
def test_keyed_graph_passes_the_tensorrt_check_without_bitwise_or_random_ops(tmp_path, dims, shape, class_axis):
    _, path = keyed_session(tmp_path, dims, class_axis)
    report = check_tensorrt_support(path, backend="tensorrt-rtx")
    assert report.errors == [], report.errors
    ops = {node.op for node in all_nodes(load_graph(path))}
    assert not {op for op in ops if op.startswith(("Bitwise", "BitShift", "Random"))}
    assert {"Mod", "Mul", "Cos", "Sin", "Log"} <= ops


def test_the_key_file_rebuilds_the_same_engine(tmp_path):
    key = NoiseKey.draw()
    path = key.write(tmp_path / "noise.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert NoiseKey.read(path) == key and NoiseKey.load_or_draw(path) == (key, False)
    assert len(key.fingerprint) == 16 and key.fingerprint != NoiseKey.draw().fingerprint
    assert key.secret.hex() not in key.fingerprint
    first, _ = keyed_session(tmp_path, ["batch", 7], key=key, name="first.onnx")
    second, _ = keyed_session(tmp_path, ["batch", 7], key=NoiseKey.read(path), name="second.onnx")
    assert (tmp_path / "first.onnx").read_bytes() == (tmp_path / "second.onnx").read_bytes()
    fresh, drawn = NoiseKey.load_or_draw(tmp_path / "missing.key")
    assert drawn and fresh != key and not (tmp_path / "missing.key").exists()


@pytest.mark.parametrize(
    "content, message",
    [("not hex at all", "hex digits"), ("00" * 16, "16 bytes"), ("", "0 bytes")],
)
def test_a_bad_key_file_says_what_a_key_is(tmp_path, content, message):
    bad = tmp_path / "bad.key"
    bad.write_text(content)
    with pytest.raises(NoiseKeyError, match=message):
        NoiseKey.read(bad)
