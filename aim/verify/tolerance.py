"""The fp32 element-wise tolerance of a build, set from the scale of its own reference logits.

A fixed atol means different things for different models: 1e-4 is 0.02% of the tiny ResNet's logit
spread but 7% of the tiny random SegFormer's (its logits differ by ~1e-3 between classes), a third of
its median top-2 gap, so an upsampling or kernel error could hide under it. The rule:

    atol = min(the family's atol, SPREAD_FRACTION x spread)
    spread = median over positions (samples, pixels, tokens) of the logits' standard deviation across
             classes: the scale on which the model's decisions are made

and the family's rtol (an element also passes within rtol x |reference|, Polygraphy's rule: that lets
the modulated comparison absorb one rounding of values ~10 logits wide, and it stays below 1e-3 of
the spread wherever |logits| < 10 x spread, as in every model here).

Why 1e-3: ONNX Runtime and PyTorch agree in fp32 to 1.4e-6 (ResNet), 3.0e-6 (SegFormer) and 1.5e-6
(Llama) of the spread on the tiny models, so the rule leaves >= 300x headroom for deeper models and
other kernels; and an error of 1e-3 of the spread is far below the median top-2 gap (0.23 of the spread
for the tiny SegFormer, 0.26 for Llama, 2 for ResNet), so no decision the tolerance lets through could
be one a real error flipped. The family's atol stays as a cap: the rule only ever tightens it.
"""

from __future__ import annotations

import numpy as np

from aim.verdicts import Tolerance

SPREAD_FRACTION = 1e-3


def logit_spread(logits: np.ndarray, class_axis: int) -> float:
    """Median over positions of the standard deviation across classes."""
    logits = np.asarray(logits, np.float64)
    per_position = np.moveaxis(logits, class_axis, -1).reshape(-1, logits.shape[class_axis])
    return float(np.median(per_position.std(axis=1)))


def scaled_tolerance(base: Tolerance, logits: np.ndarray, class_axis: int) -> Tolerance:
    """`base` (the family's) with atol tightened to SPREAD_FRACTION of the reference logits' spread."""
    spread = logit_spread(logits, class_axis)
    atol = float(min(base.atol, SPREAD_FRACTION * spread))
    why = (
        f"atol = min({base.atol:g}, {SPREAD_FRACTION:g} x logit spread {spread:.3g}) (spread: median over "
        "positions of the "
        f"std across classes); {base.why}"
    )
    return Tolerance(atol=atol, rtol=base.rtol, why=why)
