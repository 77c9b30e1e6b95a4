"""The keyed checks (verify/keyed.py): a correct keyed engine passes every one, and each check fails on
an engine with the defect it is there to catch."""

import numpy as np
import pytest
import torch

from aim.graph_passes.modulate import modulate_file
from aim.graph_passes.noise_key import KEY_BYTES, NoiseKey
from aim.graph_passes.redistribution import redistribute_torch
from aim.pipeline.engine_runs import run_keyed_checks
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.verdicts import Tolerance
from aim.verify.defects import KEYED_DEFECTS, KeyedDefectiveEngine
from aim.verify.reference import Reference, differential_knobs
from tests.conftest import tiny_classifier

KEY = NoiseKey(bytes(range(1, KEY_BYTES + 1)))
TOLERANCE = Tolerance(1e-4, 1e-4, "fp32")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A hand-made 10-class classifier's keyed and fresh production engines, its bare engine, a
    statistics batch and a reference (the checks judge noise, not the model)."""
    folder = tmp_path_factory.mktemp("keyed")
    source = tiny_classifier(folder / "bare.onnx", features=6, classes=10)
    bare = OnnxRuntimeEngine(source)
    engines = {
        "keyed": OnnxRuntimeEngine(modulate_file(source, folder / "keyed.onnx", "scores", 1, key=KEY)),
        "fresh": OnnxRuntimeEngine(modulate_file(source, folder / "fresh.onnx", "scores", 1)),
        "other key": OnnxRuntimeEngine(
            modulate_file(source, folder / "other.onnx", "scores", 1, key=NoiseKey(bytes(KEY_BYTES)))
        ),
    }
    inputs = {"x": (np.random.default_rng(0).normal(size=(32, 6)) * 3).astype(np.float32)}
    logits = bare.run(inputs)
    knobs = differential_knobs(32, 10, logits.shape, 0)
    twin = redistribute_torch(
        *(torch.from_numpy(a) for a in (logits, knobs["utility"], knobs["focus"])), key=KEY
    ).numpy()
    reference = Reference(inputs=inputs, logits=logits, modulated=logits, keyed_modulated=twin, **knobs)
    return engines, bare, inputs, logits, reference


class Defective:
    """The keyed engine with one defect."""

    def __init__(self, keyed, bare, defect):
        self.keyed, self.bare, self.defect = keyed, bare, defect

    def run(self, inputs, utility=0.0, focus=None):
        out = self.keyed.run(inputs, utility, focus)
        bare = self.bare.run(inputs)
        if self.defect == "positional":  # each row gets its neighbour's draw
            return bare + np.roll(out - bare, 1, axis=0)
        if self.defect == "tierless":  # the tier is not part of the request
            u = np.broadcast_to(np.asarray(utility, np.float32), bare.shape[:1])[:, None]
            return bare + u * (self.keyed.run(inputs, 2.0, focus) - bare) / 2.0
        if self.defect == "signed":  # focus noise of either sign
            plain = self.keyed.run(inputs, utility, None)
            return plain - (out - plain) * np.where(np.arange(bare.shape[1]) % 2, 1, -1)
        if self.defect == "scale":
            return bare + (out - bare) * np.float32(1.05)
        raise ValueError(self.defect)


def test_a_correct_keyed_engine_passes_every_check(classifier):
    engines, _, inputs, logits, reference = classifier
    checks = run_keyed_checks(engines["keyed"], inputs, logits, 1, reference, TOLERANCE)
    assert [c.name for c in checks if not c.passed] == []
    assert len(checks) == 13


@pytest.mark.parametrize(
    "defect, failing",
    [
        ("fresh", {"keyed production vs PyTorch twin (element-wise)", "same request, same answer (two runs)"}),
        (
            "positional",
            {"keyed production vs PyTorch twin (element-wise)", "same request alone and in a batch (same draw)"},
        ),
        ("tierless", {"another tier, another draw"}),
        ("signed", {"focus boost noise half-normal", "focus suppress noise half-normal"}),
        ("scale", {"utility noise ~ N(0,1), distinct requests"}),
    ],
)
def test_each_check_catches_its_defect(classifier, defect, failing):
    engines, bare, inputs, logits, reference = classifier
    engine = engines["fresh"] if defect == "fresh" else Defective(engines["keyed"], bare, defect)
    checks = run_keyed_checks(engine, inputs, logits, 1, reference, TOLERANCE)
    failed = {c.name for c in checks if not c.passed}
    assert failing <= failed, failed
    assert "identity at utility 0, focus 0" not in failed


def test_the_correlation_check_samples_large_outputs_and_still_sees_neighbours():
    """Above MAX_PAIRS pairs per axis the check draws pairs at random places: independent noise still
    passes, and pixels that repeat part of their left neighbour still fail."""
    from aim.verify.keyed import MAX_PAIRS, _correlation, _neighbours

    noise = np.random.default_rng(1).normal(size=(1, 1, 4, 800, 800)).astype(np.float32)
    assert noise.size // 800 * 799 > MAX_PAIRS
    assert _correlation("independent", _neighbours(noise, 2)).passed
    noise[..., 1:] += 0.05 * noise[..., :-1]
    check = _correlation("correlated", _neighbours(noise, 2))
    assert not check.passed and max(abs(z) for z in check.metrics["z"]) > 20


@pytest.mark.parametrize("defect", sorted(KEYED_DEFECTS))
def test_the_keyed_checks_catch_each_planted_defect(classifier, defect):
    """aim/verify/defects.py's keyed stand-ins: a constant draw, a draw that ignores the key, one shared
    between rows, one that ignores the input; the correct one ("none") passes."""
    engines, bare, inputs, logits, reference = classifier
    engine = KeyedDefectiveEngine(engines["keyed"], bare, defect, other=engines["other key"])
    checks = run_keyed_checks(engine, inputs, logits, 1, reference, TOLERANCE)
    failed = {c.name for c in checks if not c.passed}
    what, failing = KEYED_DEFECTS[defect]
    assert failing <= failed, (what, failed)
    assert (failed == set()) == (defect == "none"), failed


def test_the_agreement_check_holds_its_false_alarm_rate_on_identical_rows():
    """The statistics batch tiles the reference rows, so its inputs are as correlated as inputs can be:
    identical rows share their lattice vertices. The agreement check still counts independent trials,
    since every row of every run has a tier of its own and the tier enters every vertex's seed; so
    over keys drawn at random its z is N(0, 1) (mean z^2 of 40 keys under 2: chi2(40) / 40 exceeds
    2 with probability 1e-4). Rows of one tier would agree or not together: z^2 near the batch."""
    from aim.verify.keyed import agreement_like_fresh, tiers

    runs, batch = 4, 64
    row = np.array([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0]], np.float32)  # G(2) ~ 0.5
    bare = np.repeat(row, batch, axis=0)
    sigmas = tiers(runs, batch)
    rng = np.random.default_rng(2)
    z = []
    for _ in range(40):
        key = NoiseKey(rng.bytes(KEY_BYTES))
        noisy = np.stack(
            [
                redistribute_torch(
                    torch.from_numpy(bare), torch.from_numpy(s), torch.zeros_like(torch.from_numpy(bare)), key=key
                ).numpy()
                for s in sigmas
            ]
        )
        z.append(agreement_like_fresh(bare, noisy, sigmas, 1).metrics["z"])
    assert np.mean(np.square(z)) < 2.0, np.round(z, 2)
