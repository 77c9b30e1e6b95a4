"""`aim attack` end to end on a briefly trained ResNet: averaging K answers to fresh noise follows the
theory G(sigma / sqrt K); keyed noise gives exact repeats nothing and perturbed repeats little."""

from __future__ import annotations

import csv
import json

import numpy as np
from matplotlib import image

import aim.cli as cli
from aim.evaluation.attack import QUERIES

INPUTS = 128


def test_attack_writes_its_curves_and_keyed_noise_holds(quick_checkpoint, tmp_path):
    checkpoint = quick_checkpoint("resnet")["checkpoint"]
    key = tmp_path / "noise.key"
    argv = [
        "attack",
        "resnet",
        "--out",
        str(tmp_path),
        "--checkpoint",
        checkpoint,
        "--inputs",
        str(INPUTS),
        "--noise-key",
        str(key),
    ]
    assert cli.main(argv) == 0
    folder = tmp_path / "resnet" / "attack"
    with open(folder / "attack.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 3 * len(QUERIES)

    def curve(noise, repeats, aggregate, field="agreement"):
        return np.array(
            [float(r[field]) for r in rows if (r["noise"], r["repeats"], r["aggregate"]) == (noise, repeats, aggregate)]
        )

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rows"] == INPUTS and abs(summary["agreement_one_query_theory"] - 0.5) < 0.01
    # Fresh noise: the mean of K answers agrees as G(sigma / sqrt K) predicts, within 4 standard
    # errors (binomial over the rows; the seven points are one cumulative sequence).
    measured, predicted, error = (curve("fresh", "exact", "mean", f) for f in ("agreement", "theory", "standard_error"))
    assert np.all(np.abs(measured - predicted) <= 4 * np.maximum(error, np.sqrt(0.25 / INPUTS) / 4))
    assert measured[-1] > measured[0] + 0.25
    assert np.array_equal(curve("fresh", "exact", "distinct"), measured)  # every fresh answer is a draw of its own
    # Keyed noise: 64 exact repeats are one answer 64 times.
    for aggregate in ("mean", "vote", "distinct"):
        exact = curve("keyed", "exact", aggregate)
        assert np.all(exact == exact[0])
    # Perturbed repeats buy a fresh draw rarely, and gain far less than against fresh noise.
    assert summary["keyed_fresh_draw_share"] < 0.2
    keyed_gain = curve("keyed", "perturbed", "distinct")[-1] - curve("keyed", "perturbed", "distinct")[0]
    fresh_gain = curve("fresh", "perturbed", "mean")[-1] - curve("fresh", "perturbed", "mean")[0]
    assert keyed_gain < fresh_gain / 2
    pixels = image.imread(folder / "attack.png")
    assert pixels.shape[0] > 300 and np.std(pixels[..., :3]) > 0.05
    # The key file is written once the attack has run, readable by its owner only.
    assert key.is_file() and oct(key.stat().st_mode & 0o777) == "0o600"
