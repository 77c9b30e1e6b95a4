"""Keyed noise against stored answers: a fixed key and request, and the outputs the keyed statement
gave for them when this file was made (tests/data/keyed_golden.npz). The other keyed tests check that
the generator agrees with itself (ONNX Runtime with the PyTorch twin, a row alone with its batch),
which a change of the derivation (a keyed offset dropped from the digest, two SHAKE labels swapped)
keeps; this one sees it, since every such change draws other noise.

The file is made on purpose only, by a change of the keyed noise that means to change every answer
(and every key file's engines with it):

    .venv/bin/python -m tests.verify.test_keyed_golden --regenerate
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from aim.graph_passes.noise_key import KEY_BYTES, NoiseKey

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "keyed_golden.npz"
KEY = NoiseKey(bytes(range(101, 101 + KEY_BYTES)))
# The answers are float32 after Log, Sqrt, Cos and Sin, whose last bits may differ between CPUs'
# kernels; every change of the derivation moves the noise by O(1).
ATOL = 1e-5


def requests() -> dict[str, np.ndarray]:
    """Fixed requests: a 10-class classifier's input, and a rank-4 logits tensor (per-position noise)."""
    rng = np.random.default_rng(20261206)
    utility = np.array([0.5, 1.0, 2.0, 2.0, 0.0, 3.5], np.float32)
    focus = np.zeros((6, 10), np.float32)
    focus[:, 3], focus[1:, 7] = 4.0, -2.5
    return {
        "x": (rng.normal(size=(6, 6)) * 3).astype(np.float32),
        "utility": utility,
        "focus": focus,
        "spatial_logits": rng.normal(size=(2, 5, 3, 4)).astype(np.float32),
        "spatial_utility": np.array([1.0, 0.25], np.float32),
        "spatial_focus": np.array([[0, 3, 0, -1, 0], [2, 0, 0, 0, 0]], np.float32),
    }


def answers(folder: Path) -> dict[str, np.ndarray]:
    """The keyed production engine's (ONNX Runtime) and the PyTorch twin's answers to requests()."""
    import torch

    from aim.graph_passes.modulate import modulate_file
    from aim.graph_passes.redistribution import redistribute_torch
    from aim.runtime.onnxruntime import OnnxRuntimeEngine
    from tests.conftest import tiny_classifier

    asked = requests()
    source = tiny_classifier(folder / "bare.onnx", features=6, classes=10, seed=3)
    logits = OnnxRuntimeEngine(source).run({"x": asked["x"]})
    engine = OnnxRuntimeEngine(modulate_file(source, folder / "keyed.onnx", "scores", 1, key=KEY))

    def twin(z, utility, focus):
        return redistribute_torch(*(torch.from_numpy(a) for a in (z, utility, focus)), key=KEY).numpy()

    return {
        "engine": engine.run({"x": asked["x"]}, asked["utility"], asked["focus"]),
        "twin": twin(logits, asked["utility"], asked["focus"]),
        "spatial_twin": twin(asked["spatial_logits"], asked["spatial_utility"], asked["spatial_focus"]),
        "logits": logits,
    }


def test_keyed_noise_gives_the_stored_answers(tmp_path):
    stored = np.load(GOLDEN)
    assert KEY.fingerprint == str(stored["fingerprint"])  # the key these answers were made with
    got = answers(tmp_path)
    np.testing.assert_array_equal(got["logits"], stored["logits"])  # the same request: nothing else moved
    for name in ("engine", "twin", "spatial_twin"):
        np.testing.assert_allclose(got[name], stored[name], rtol=0, atol=ATOL, err_msg=name)
    noise = stored["twin"] - stored["logits"]
    assert np.mean(np.abs(noise[stored["utility"] > 0]) > 10 * ATOL) > 0.9  # the answers hold noise to see


def test_the_golden_file_is_not_the_code_agreeing_with_itself():
    """The stored answers differ from those of another key, and from the bare logits: a test that
    compared the generator with itself would not need them."""
    import torch

    from aim.graph_passes.redistribution import redistribute_torch

    stored = np.load(GOLDEN)
    other = NoiseKey(bytes(KEY_BYTES))
    z, u, f = (torch.from_numpy(stored[k]) for k in ("logits", "utility", "focus"))
    assert np.max(np.abs(redistribute_torch(z, u, f, key=other).numpy() - stored["twin"])) > 0.5


def regenerate() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        made = answers(Path(folder))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    np.savez(GOLDEN, fingerprint=np.array(KEY.fingerprint), **requests(), **made)
    print(f"wrote {GOLDEN}: keyed answers of key {KEY.fingerprint}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: python -m tests.verify.test_keyed_golden --regenerate   (rewrites {GOLDEN})")
    regenerate()
