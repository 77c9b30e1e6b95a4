"""Stand-ins for production engines with known noise defects: the statistical checks must fail on
each of them (their power, tests/verify/test_statistics.py and `make false-alarms`) and pass on the
defect-free one. The noise is drawn with numpy, z' = z + utility * n1 + focus * |n2|, as the graph does.
"""

from __future__ import annotations

import numpy as np

from aim.verify.statistics import STATISTICAL_CHECKS

UTILITY_CHECK, BOOST_CHECK, SUPPRESS_CHECK, INDEPENDENCE_CHECK, CORRELATION_CHECK = STATISTICAL_CHECKS
# defect -> (what it is, the check that must fail on it)
DEFECTS = {
    "none": ("a correct engine", None),
    "scale": ("utility noise 5% too wide (n1 * 1.05)", UTILITY_CHECK),
    "merged": ("one draw for both noises (n2 = n1): two random nodes merged by an optimiser", INDEPENDENCE_CHECK),
    "shifted": ("a shifted stream: n2 of class k is the draw that gave n1 of class k+1", CORRELATION_CHECK),
    "shifted-rows": (
        "a shifted stream across rows: n2 of row r is the draw that gave n1 of row r+1",
        CORRELATION_CHECK,
    ),
    "stale": ("the same draws on every run", "fresh draws"),
    "rows-repeat": ("one draw broadcast to the whole batch: every row gets row 0's noise", "fresh draws"),
    "signed": ("focus noise n2 instead of |n2|: a boost can lower the class", BOOST_CHECK),
}


class DefectiveEngine:
    """`run(inputs, utility, focus)` like a runner, on fixed bare logits [B, C, ...] (`class_axis`)."""

    def __init__(self, bare: np.ndarray, class_axis: int = 1, defect: str = "none", seed: int = 0):
        if defect not in DEFECTS:
            raise ValueError(f"unknown defect {defect!r}; known: {sorted(DEFECTS)}")
        self.bare, self.axis, self.defect, self.seed = bare, class_axis, defect, seed
        self.rng = np.random.default_rng(seed)

    def _knob(self, value, axes: int) -> np.ndarray:
        """utility (axes 1: [B]) or focus (axes 2: [B, C]) broadcast and shaped to multiply the logits."""
        shape = self.bare.shape
        full = np.broadcast_to(
            np.asarray(0.0 if value is None else value, np.float64), (shape[0], shape[self.axis])[:axes]
        )
        if axes == 1:
            return full.reshape((shape[0],) + (1,) * (len(shape) - 1))
        return np.expand_dims(full, tuple(a for a in range(len(shape)) if a not in (0, self.axis)))

    def run(self, inputs, utility=0.0, focus=None) -> np.ndarray:
        shape = self.bare.shape
        if self.defect == "stale":
            self.rng = np.random.default_rng(self.seed)  # every run starts the same stream again
        n1, n2 = self.rng.standard_normal(shape), self.rng.standard_normal(shape)
        if self.defect == "merged":
            n2 = n1
        elif self.defect == "shifted":
            n2 = np.roll(n1, -1, axis=self.axis)
        elif self.defect == "shifted-rows":
            n2 = np.roll(n1, -1, axis=0)
        elif self.defect == "scale":
            n1 = n1 * 1.05
        elif self.defect == "rows-repeat":
            n1, n2 = np.broadcast_to(n1[:1], shape), np.broadcast_to(n2[:1], shape)
        focus_noise = n2 if self.defect == "signed" else np.abs(n2)
        return (self.bare + self._knob(utility, 1) * n1 + self._knob(focus, 2) * focus_noise).astype(self.bare.dtype)
