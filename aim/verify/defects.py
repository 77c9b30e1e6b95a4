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


# Keyed noise: defect -> (what it is, the keyed checks (verify/keyed.py) that must fail on it).
TWIN_CHECK = "keyed production vs PyTorch twin (element-wise)"
DISTINCT_CHECK = "distinct inputs, one tier: independent noise"
KEYED_DEFECTS = {
    "none": ("a correct keyed engine", set()),
    "constant": (
        "one draw for every request: the tier and the input ignored",
        {TWIN_CHECK, "another tier, another draw", "utility noise ~ N(0,1), distinct requests", DISTINCT_CHECK},
    ),
    "keyless": ("the draw of another key: the build's key ignored", {TWIN_CHECK}),
    "shared-rows": (
        "every row of a batch gets the draw of the batch's first row",
        {TWIN_CHECK, "same request alone and in a batch (same draw)", DISTINCT_CHECK},
    ),
    "inputless": (
        "a draw of the key and the tier alone: every input at a tier gets the same",
        {TWIN_CHECK, DISTINCT_CHECK},
    ),
    "ranked": (
        "each row's lowest draw swapped onto its clean top class: every marginal as before, the answer worse",
        {TWIN_CHECK, "one query agrees as under fresh noise"},
    ),
}


class KeyedDefectiveEngine:
    """A keyed engine with one defect, made from correct ones: `keyed` (the build's key), `bare` (the
    model's logits) and `other` (the same model keyed with another key, for "keyless"). Every input has
    the batch on axis 0."""

    def __init__(self, keyed, bare, defect: str = "none", other=None):
        if defect not in KEYED_DEFECTS:
            raise ValueError(f"unknown keyed defect {defect!r}; known: {sorted(KEYED_DEFECTS)}")
        self.keyed, self.bare, self.defect, self.other = keyed, bare, defect, other
        self.fixed = None  # the first row the engine saw: "inputless" and "constant" draw as if it were every row

    @staticmethod
    def _rows_like(inputs: dict, row: dict) -> dict:
        batch = next(iter(inputs.values())).shape[0]
        return {name: np.repeat(value, batch, axis=0) for name, value in row.items()}

    def _noise_of(self, inputs: dict, utility, focus) -> np.ndarray:
        """What the correct engine adds to the logits of `inputs`."""
        return self.keyed.run(inputs, utility, focus).astype(np.float64) - self.bare.run(inputs).astype(np.float64)

    def _ranked(self, inputs, utility, focus) -> np.ndarray:
        """Classes on axis 1: at every row and position, the draw of the clean top class and the lowest
        draw trade places."""
        bare = self.bare.run(inputs)
        noise = self._noise_of(inputs, utility, focus)
        top = np.expand_dims(bare.argmax(axis=1), 1)
        low = np.expand_dims(noise.argmin(axis=1), 1)
        at_top, at_low = np.take_along_axis(noise, top, 1), np.take_along_axis(noise, low, 1)
        np.put_along_axis(noise, low, at_top, 1)
        np.put_along_axis(noise, top, at_low, 1)
        return (bare.astype(np.float64) + noise).astype(bare.dtype)

    def run(self, inputs, utility=0.0, focus=None) -> np.ndarray:
        if self.defect == "none":
            return self.keyed.run(inputs, utility, focus)
        if self.defect == "keyless":
            return self.other.run(inputs, utility, focus)
        if self.defect == "ranked":
            return self._ranked(inputs, utility, focus)
        if self.fixed is None:
            self.fixed = {name: value[:1] for name, value in inputs.items()}
        bare = self.bare.run(inputs)
        if self.defect == "shared-rows":
            noise = self._noise_of(self._rows_like(inputs, {k: v[:1] for k, v in inputs.items()}), utility, focus)
        elif self.defect == "inputless":
            noise = self._noise_of(self._rows_like(inputs, self.fixed), utility, focus)
        else:  # constant: the fixed row's draw at one tier, scaled to the request's utility
            fixed = self._rows_like(inputs, self.fixed)
            sigma = 2.0
            utility_noise = self._noise_of(fixed, sigma, None)
            scale = np.broadcast_to(np.asarray(utility, np.float64), bare.shape[:1]) / sigma
            noise = scale.reshape((-1,) + (1,) * (bare.ndim - 1)) * utility_noise
            noise = noise + self._noise_of(fixed, sigma, focus) - utility_noise
        return (bare.astype(np.float64) + noise).astype(bare.dtype)
