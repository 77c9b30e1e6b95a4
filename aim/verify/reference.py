"""What a build is verified against, saved beside it (reference.npz) so that a later run (another
backend, another machine, `aim verify` without PyTorch) checks against the same outputs.

The differential run mixes service tiers in one batch: even rows at utility 0, odd rows at
DIFFERENTIAL_UTILITY, boosting one class and suppressing another; the noise is drawn on the host
from a seed and given to the verification flavour as inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aim.files import atomic_path

DIFFERENTIAL_UTILITY = 2.5  # sigma of the noisy rows
DIFFERENTIAL_FOCUS = 4.0  # strength of the boosted and the suppressed class


@dataclass
class Reference:
    inputs: dict[str, np.ndarray]  # the model's inputs
    utility: np.ndarray  # [B]
    focus: np.ndarray  # [B, C]
    noise_utility: np.ndarray  # like the logits
    noise_focus: np.ndarray  # like the logits
    logits: np.ndarray  # the reference model's logits (as the deployed graph computes them)
    modulated: np.ndarray  # the reference redistribution of `logits` on the same knobs and noise
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # the task's own (e.g. generation)
    source: str = "PyTorch"  # what computed logits and modulated: PyTorch, or the user's bare graph
    # Keyed builds: the PyTorch twin of the keyed production graph on the bare engine's logits for
    # `inputs`, `utility` and `focus` (what the production engine must answer, element-wise).
    keyed_modulated: np.ndarray | None = None

    _FIELDS = ("utility", "focus", "noise_utility", "noise_focus")

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"input.{name}": array for name, array in self.inputs.items()}
        out.update({name: getattr(self, name) for name in self._FIELDS})
        out.update(
            reference_logits=self.logits, reference_modulated=self.modulated, reference_source=np.array(self.source)
        )
        if self.keyed_modulated is not None:
            out["reference_keyed_modulated"] = self.keyed_modulated
        out.update(self.extra)
        return {name: np.require(array, requirements="C") for name, array in out.items()}  # keeps 0-d arrays 0-d

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(array.shape) for name, array in self.arrays().items()}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **self.arrays())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Reference:
        with np.load(path, allow_pickle=False) as stored:
            arrays = dict(stored)
        known = {
            *cls._FIELDS,
            "reference_logits",
            "reference_modulated",
            "reference_source",
            "reference_keyed_modulated",
        }
        return cls(
            inputs={name.removeprefix("input."): a for name, a in arrays.items() if name.startswith("input.")},
            **{name: arrays[name] for name in cls._FIELDS},
            logits=arrays["reference_logits"],
            modulated=arrays["reference_modulated"],
            extra={name: a for name, a in arrays.items() if name not in known and not name.startswith("input.")},
            source=str(arrays["reference_source"]),
            keyed_modulated=arrays.get("reference_keyed_modulated"),
        )


def differential_knobs(batch: int, num_classes: int, logits_shape, seed: int) -> dict[str, np.ndarray]:
    """utility, focus and both noises of the differential run (FP32, seeded)."""
    utility = np.zeros(batch, np.float32)
    utility[1::2] = DIFFERENTIAL_UTILITY  # mixed service tiers in one batch
    focus = np.zeros((batch, num_classes), np.float32)
    focus[1::2, 1 % num_classes] = DIFFERENTIAL_FOCUS  # boost one class
    focus[1::2, 0] = -DIFFERENTIAL_FOCUS  # suppress another
    rng = np.random.default_rng(seed + 1)
    noise = rng.standard_normal((2, *logits_shape), dtype=np.float32)
    return {"utility": utility, "focus": focus, "noise_utility": noise[0], "noise_focus": noise[1]}


def tile_batch(inputs: dict[str, np.ndarray], repeats: int) -> dict[str, np.ndarray]:
    return {name: np.concatenate([array] * repeats) for name, array in inputs.items()}
