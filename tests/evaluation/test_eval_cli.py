"""`aim eval` and `aim calibrate` end to end on a briefly trained ResNet (short grids): the full
pipeline builds the engine from the checkpoint, the sweep writes its CSV, summary and plots, and
calibration records its table in a manifest that `aim verify` still accepts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib import image

import aim.cli as cli
from aim.evaluation import calibrate, sweep
from aim.layout import CALIBRATION_FILES, Manifest
from aim.runtime.onnxruntime import OnnxRuntimeEngine


@pytest.fixture(scope="module")
def evaluated(quick_checkpoint, tmp_path_factory):
    checkpoint = quick_checkpoint("resnet")["checkpoint"]
    out = tmp_path_factory.mktemp("eval-cli")
    summary = sweep.evaluate(
        "resnet", out, checkpoint, repeats=2, utility_grid=[0.0, 1.0, 4.0], focus_grid=[0.0, 4.0], log=lambda _: None
    )
    return out, checkpoint, summary


def test_eval_writes_csv_summary_and_plots(evaluated):
    out, _, summary = evaluated
    folder = out / "resnet" / "eval"
    points = sweep.read_csv(folder / "sweep.csv")
    assert {p.sweep for p in points} == {"utility", "boost", "suppress"}
    assert {p.strength for p in points if p.sweep == "utility"} == {0.0, 1.0, 4.0}
    zero = [p for p in points if p.sweep == "utility" and p.strength == 0.0 and p.quantity == "agreement"]
    assert zero[0].measured == 1.0 and zero[0].predicted == 1.0
    assert json.loads((folder / "summary.json").read_text())["comparisons"]["utility/agreement"]["points"] == 3
    # a person looks at the plots; the test checks that they are whole PNGs of the intended size
    for name, panels in (("utility", 1), ("focus", 2)):
        pixels = image.imread(folder / f"{name}.png")
        assert pixels.shape[:2] == (495, 715 * panels)
        assert np.std(pixels[..., :3]) > 0.05  # not blank: markers, lines and text on white
    assert summary["clean"]["accuracy"] > 0.5


def test_calibrate_records_table_and_keeps_the_build_verifiable(evaluated, capsys):
    out, checkpoint, _ = evaluated
    entry = calibrate.calibrate("resnet", out, checkpoint, log=lambda _: None)
    manifest = Manifest.load(out / "resnet")
    assert manifest.calibration["sigmas"] == entry["sigmas"] and len(entry["sigmas"]) == 101
    assert manifest.calibration["calibration_set"]["labels_used"] is False
    for key in CALIBRATION_FILES:
        assert manifest.path(key).is_file()
    engine = OnnxRuntimeEngine(manifest.path("calibrated_engine"))
    assert engine.calibrated
    checks = entry["check"]["levels"]
    assert checks[-1]["level"] == 1.0 and checks[-1]["measured"] == 1.0
    assert cli.main(["verify", str(out / "resnet")]) == 0


def test_eval_of_a_foreign_checkpoint_measures_label_free_quantities(tmp_path):
    """A checkpoint not trained here (3-channel tiny ResNet, random weights): the digits are fed as
    3 channels, and since its classes are not the digits' labels only agreement, boost rate and
    survival are compared with the theory."""
    from tests.conftest import load

    load("resnet", seed=0)[2].save_pretrained(tmp_path / "foreign")
    summary = sweep.evaluate(
        "resnet",
        tmp_path / "build",
        tmp_path / "foreign",
        repeats=1,
        utility_grid=[0.0, 0.05],
        focus_grid=[0.0, 0.05],
        log=lambda _: None,
    )
    assert summary["clean"] == {}
    assert set(summary["comparisons"]) == {"utility/agreement", "boost/boost_rate", "suppress/survival"}
