"""What every engine runner shares: the input checks and the modulation knobs.

A runner has `path`, `inputs` ({name: (numpy dtype or None, dims)}, dims ints or dim names),
`outputs` (names) and `infer(feed) -> {name: array}`; this base class adds the checked feed and
`run(inputs, utility, focus)`.
"""

from __future__ import annotations

import numpy as np

from aim.errors import InvalidInputError
from aim.graph_passes.redistribution import FOCUS, UTILITY, check_modulation


class Runner:
    @property
    def modulated(self) -> bool:
        return UTILITY in self.inputs and FOCUS in self.inputs

    @property
    def calibrated(self) -> bool:
        """Takes a calibrated `utility_level` in [0, 1] instead of sigma (graph_passes.calibration)."""
        from aim.graph_passes.calibration import UTILITY_LEVEL

        return UTILITY_LEVEL in self.inputs and FOCUS in self.inputs

    @property
    def num_classes(self) -> int:
        return self.inputs[FOCUS][1][1]

    def check_feed(self, feed: dict) -> dict[str, np.ndarray]:
        """Names, dtypes, ranks and sizes against the engine's inputs; consistent dynamic dims."""
        missing = sorted(set(self.inputs) - set(feed))
        unexpected = sorted(set(feed) - set(self.inputs))
        if missing or unexpected:
            raise InvalidInputError(
                f"{self.path.name} takes inputs {sorted(self.inputs)}; "
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
                            f"dim {want!r} is {got} in input {name!r} but {bound[want][0]} in {other!r}: they must agree"
                        )
            checked[name] = array
        return checked

    def run(self, inputs: dict, utility=0.0, focus=None, level=None, **noise) -> np.ndarray:
        """The first output (the logits) for model `inputs` with the modulation knobs checked and
        broadcast: `utility` a number or [B], `focus` None, [C] or [B, C]. A calibrated engine takes
        `level` (a number or [B] in [0, 1]; default 1, the exact model) instead of `utility`."""
        feed = dict(inputs)
        batch = int(np.shape(next(iter(inputs.values())))[0]) if inputs else 0  # no inputs: check_feed says which
        if self.calibrated:
            from aim.graph_passes.calibration import UTILITY_LEVEL, check_level

            if np.any(np.asarray(utility) != 0):
                raise InvalidInputError(f"{self.path.name} is calibrated: pass level= in [0, 1], not a utility sigma")
            feed[UTILITY_LEVEL] = check_level(1.0 if level is None else level, batch)
            feed[FOCUS] = check_modulation(0.0, focus, batch, self.num_classes)[1]
        elif level is not None:
            raise InvalidInputError(f"{self.path.name} is not calibrated: it takes utility (sigma), not level")
        elif not self.modulated and (np.any(np.asarray(utility) != 0) or focus is not None):
            raise InvalidInputError(f"{self.path.name} is not modulated: it has no utility or focus input")
        elif self.modulated:
            feed[UTILITY], feed[FOCUS] = check_modulation(utility, focus, batch, self.num_classes)
        feed.update(noise)
        return self.infer(feed)[self.outputs[0]]
