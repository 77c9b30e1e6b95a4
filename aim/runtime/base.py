"""What every engine runner shares: the input checks, the modulation knobs, and the life cycle.

A runner has `path`, `inputs` ({name: (numpy dtype or None, dims)}, dims ints or dim names),
`outputs` (names) and, where known, `profile` ({input: {"min", "opt", "max"}}: the shapes the engine
was built for). As in Polygraphy's runners, `infer(feed)` always checks the feed first and only then
runs the backend (`_infer`); `run(inputs, utility, focus)` adds the modulation knobs. Runners are
context managers: leaving the block releases what the backend holds (GPU memory, sessions).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from aim.contract import FOCUS, UTILITY, UTILITY_LEVEL, check_level, check_modulation
from aim.errors import InvalidGraphError, InvalidInputError


def check_profile(feed: dict[str, np.ndarray], profile: dict[str, dict[str, list[int]]], engine: str = "the engine"):
    """Refuses shapes outside the engine's optimization profile before anything runs."""
    for name, shapes in profile.items():
        if name not in feed:
            continue
        shape = list(np.shape(feed[name]))
        low, high = shapes["min"], shapes["max"]
        if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
            raise InvalidInputError(
                f"input {name!r} has shape {shape}, outside the range {engine} was built for: min {low}, max {high}. "
                f"Use shapes in that range, or rebuild the engine with a wider range (the DimRange of that dim in "
                f"the model's family)."
            )


def profile_from_io(inputs, dims: dict) -> dict[str, dict[str, list[int]]]:
    """One optimization profile for graph inputs (layout.Tensor: name, dims): each named dim takes
    its DimRange (min, opt, max) from `dims` (the family's, or the manifest's dynamic_dims), each int
    stays fixed. utility [batch] and focus [batch, C] follow the batch range,
    the verification flavour's noise inputs follow the logits' dims, past_key_values follow whatever
    dims the config names: nothing here knows a family."""
    profile = {}
    for tensor in inputs:
        shapes = {"min": [], "opt": [], "max": []}
        for axis, dim in enumerate(tensor.dims):
            if isinstance(dim, int) and dim > 0:
                for key in shapes:
                    shapes[key].append(dim)
                continue
            if dim not in dims:
                raise InvalidGraphError(
                    f"input {tensor.name!r} axis {axis} has dynamic dim {dim!r}, which has no range (ranges are "
                    f"given for {sorted(dims)}). Give its range (--min-shapes/--opt-shapes/--max-shapes, or a "
                    f"DimRange in the family), or export with that axis named after one of them."
                )
            rng = dims[dim]
            rng = rng if isinstance(rng, dict) else {"min": rng.min, "opt": rng.opt, "max": rng.max}
            for key in shapes:
                shapes[key].append(int(rng[key]))
        profile[tensor.name] = shapes
    return profile


class Runner:
    path = None
    inputs: dict = {}
    outputs: list = []
    profile: dict | None = None

    # -- the life cycle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Releases what the backend holds; the runner may not be used afterwards."""

    # -- what the engine takes

    @property
    def name(self) -> str:
        return getattr(self.path, "name", None) or "the engine"

    @property
    def modulated(self) -> bool:
        return UTILITY in self.inputs and FOCUS in self.inputs

    @property
    def calibrated(self) -> bool:
        """Takes a calibrated `utility_level` in [0, 1] instead of sigma (graph_passes.calibration)."""
        return UTILITY_LEVEL in self.inputs and FOCUS in self.inputs

    @property
    def num_classes(self) -> int:
        return self.inputs[FOCUS][1][1]

    def check_feed(self, feed: dict) -> dict[str, np.ndarray]:
        """Names, dtypes, ranks and sizes against the engine's inputs; consistent dynamic dims; the
        profile's range where one is known."""
        missing = sorted(set(self.inputs) - set(feed))
        unexpected = sorted(set(feed) - set(self.inputs))
        if missing or unexpected:
            raise InvalidInputError(
                f"{self.name} takes inputs {sorted(self.inputs)}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"unexpected {unexpected}" if unexpected else "")
            )
        checked, bound = {}, {}
        for name, (dtype, dims) in self.inputs.items():
            array = np.asarray(feed[name])
            if dtype is not None and array.dtype != dtype:
                if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                    raise InvalidInputError(f"input {name!r} must be {np.dtype(dtype).name}, got {array.dtype}")
                array = array.astype(dtype)
            if array.ndim != len(dims):
                raise InvalidInputError(
                    f"input {name!r} must have rank {len(dims)} (dims {dims}), got shape {list(array.shape)}"
                )
            for axis, (want, got) in enumerate(zip(dims, array.shape)):
                if isinstance(want, int) and want != got:
                    raise InvalidInputError(
                        f"input {name!r} has size {got} on axis {axis}, but this engine was built for {want} "
                        f"(dims {dims}). Reshape the input, or rebuild the engine for this model."
                    )
                if isinstance(want, str):
                    if bound.setdefault(want, (got, name))[0] != got:
                        other = bound[want][1]
                        raise InvalidInputError(
                            f"dim {want!r} is {got} in input {name!r} but {bound[want][0]} in {other!r}: they "
                            "must agree"
                        )
            checked[name] = array
        if self.profile:
            check_profile(checked, self.profile, self.name)
        return checked

    # -- running

    def infer(self, feed: dict) -> dict[str, np.ndarray]:
        """{output name: array} for a feed of every input; the feed is checked first."""
        return self._infer(self.check_feed(feed))

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def run(self, inputs: dict, utility=0.0, focus=None, level=None, **noise) -> np.ndarray:
        """The first output (the logits) for model `inputs` with the modulation knobs checked and
        broadcast: `utility` a number or [B], `focus` None, [C] or [B, C]. A calibrated engine takes
        `level` (a number or [B] in [0, 1]; default 1, the exact model) instead of `utility`."""
        feed = dict(inputs)
        first = np.shape(next(iter(inputs.values()))) if inputs else ()  # no inputs: check_feed says which
        batch = int(first[0]) if first else 0
        if first and batch == 0:
            raise InvalidInputError(
                f"the inputs of {self.name} hold no sample (batch 0, shape {list(first)}): give at least one"
            )
        if self.calibrated:
            if np.any(np.asarray(utility) != 0):
                raise InvalidInputError(f"{self.name} is calibrated: pass level= in [0, 1], not a utility sigma")
            feed[UTILITY_LEVEL] = check_level(1.0 if level is None else level, batch)
            feed[FOCUS] = check_modulation(0.0, focus, batch, self.num_classes)[1]
        elif level is not None:
            raise InvalidInputError(f"{self.name} is not calibrated: it takes utility (sigma), not level")
        elif not self.modulated and (np.any(np.asarray(utility) != 0) or focus is not None):
            raise InvalidInputError(f"{self.name} is not modulated: it has no utility or focus input")
        elif self.modulated:
            feed[UTILITY], feed[FOCUS] = check_modulation(utility, focus, batch, self.num_classes)
        feed.update(noise)
        return self.infer(feed)[self.outputs[0]]


class OnFirstUse:
    """A runner opened on first use and released by close() (a later use opens it again). The bare,
    verification and production engines of a build are checked one after the other through these,
    so that a large model's weights are in memory once, not three times."""

    def __init__(self, open_runner: Callable[[], Runner]):
        self._open, self._runner = open_runner, None

    def __getattr__(self, name):
        if self._runner is None:
            self._runner = self._open()
        return getattr(self._runner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._runner is not None:
            self._runner.close()
            self._runner = None
