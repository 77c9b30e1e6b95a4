"""`aim attack` end to end on a briefly trained ResNet: averaging K answers to fresh noise follows the
theory G(sigma / sqrt K); keyed noise gives exact repeats nothing and randomly perturbed repeats
little, since a slightly moved request keeps nearly its draw; the optimising attacker is measured."""

from __future__ import annotations

import csv
import json

import numpy as np
from matplotlib import image

import aim.cli as cli
from aim.evaluation.attack import OPTIMISED, QUERIES

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
        "--kinds",
        "levels-1",
        "levels-4",
        OPTIMISED,  # levels-16 left out: the suite's time
    ]
    assert cli.main(argv) == 0
    folder = tmp_path / "resnet" / "attack"
    with open(folder / "attack.csv") as handle:
        rows = list(csv.DictReader(handle))
    kinds = ["levels-1", "levels-4"]
    assert len(rows) == (1 + len(kinds) + 1) * 2 * 3 * len(QUERIES)  # exact, every kind, optimised

    def curve(noise, repeats, aggregate, kind="", field="agreement"):
        return np.array(
            [
                float(r[field])
                for r in rows
                if (r["noise"], r["repeats"], r["aggregate"], r["perturbation"]) == (noise, repeats, aggregate, kind)
            ]
        )

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rows"] == INPUTS and abs(summary["agreement_one_query_theory"] - 0.5) < 0.01
    # Fresh noise: the mean of K answers agrees as G(sigma / sqrt K) predicts, within 4 standard
    # errors (binomial over the rows; the seven points are one cumulative sequence).
    measured, predicted, error = (
        curve("fresh", "exact", "mean", field=f) for f in ("agreement", "theory", "standard_error")
    )
    assert np.all(np.abs(measured - predicted) <= 4 * np.maximum(error, np.sqrt(0.25 / INPUTS) / 4))
    assert measured[-1] > measured[0] + 0.25
    assert np.array_equal(curve("fresh", "exact", "distinct"), measured)  # every fresh answer is a draw of its own
    # Keyed noise: 64 exact repeats are one answer 64 times.
    for aggregate in ("mean", "vote", "distinct"):
        exact = curve("keyed", "exact", aggregate)
        assert np.all(exact == exact[0])
    # Randomly perturbed repeats keep nearly the request's draw (the noise is smooth in the logits) and
    # gain far less than against fresh noise; the optimising attacker is measured whatever it gains.
    effects = summary["variant_effects"]
    assert effects["levels-1"]["noise_correlation"] > 0.98 and effects["levels-1"]["logit_move_sigmas"] < 0.05
    assert effects["levels-4"]["logit_move_sigmas"] > effects["levels-1"]["logit_move_sigmas"]
    for kind in ("levels-1", "levels-4"):
        keyed_gain = curve("keyed", "perturbed", "mean", kind)[-1] - curve("keyed", "perturbed", "mean", kind)[0]
        fresh_gain = curve("fresh", "perturbed", "mean", kind)[-1] - curve("fresh", "perturbed", "mean", kind)[0]
        assert keyed_gain < fresh_gain / 2, kind
        assert abs(summary["gain_of_64_queries"][kind]["keyed"] - keyed_gain) < 1e-9
    assert set(summary["gain_of_64_queries"]) == {"exact", *kinds, OPTIMISED}
    assert summary["gain_of_64_queries"][OPTIMISED]["fresh"] > 0.25
    pixels = image.imread(folder / "attack.png")
    assert pixels.shape[0] > 300 and np.std(pixels[..., :3]) > 0.05
    # The key file is written once the attack has run, readable by its owner only.
    assert key.is_file() and oct(key.stat().st_mode & 0o777) == "0o600"
