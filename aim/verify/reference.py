"""What a build is verified against, saved beside it (reference.npz) so that a later run (another
backend, another machine, `aim verify` without PyTorch) checks against the same outputs; and the one
place references are made (`reference_of`, `keyed_expectation`): the reference model's logits come
from the build's source (PyTorch, or a user's bare ONNX on ONNX Runtime), the redistribution on them
from its PyTorch twin.

The differential run mixes service tiers in one batch: even rows at utility 0, odd rows at
DIFFERENTIAL_UTILITY, boosting one class and suppressing another; the noise is drawn on the host
from a seed and given to the verification flavour as inputs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
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


def reference_of(
    inputs: dict[str, np.ndarray],
    logits: np.ndarray,
    class_axis: int,
    seed: int = 0,
    source: str = "PyTorch",
    extra: dict[str, np.ndarray] | None = None,
) -> Reference:
    """The reference of a build: the reference model's `logits` for `inputs` (computed by `source`), and
    the PyTorch twin of the redistribution on them with the seeded knobs and noise of the differential
    run; `extra`: the task's own reference arrays (generation)."""
    import torch

    from aim.graph_passes.redistribution import redistribute_torch

    knobs = differential_knobs(logits.shape[0], logits.shape[class_axis], tuple(logits.shape), seed)
    modulated = redistribute_torch(
        torch.from_numpy(logits), class_axis=class_axis, **{name: torch.from_numpy(a) for name, a in knobs.items()}
    )
    return Reference(
        inputs=inputs, logits=logits, modulated=modulated.numpy(), extra=dict(extra or {}), source=source, **knobs
    )


def keyed_expectation(bare: np.ndarray, reference: Reference, class_axis: int, key) -> np.ndarray:
    """What a keyed production engine must answer to the reference's inputs and knobs: the PyTorch twin
    of the same keyed statement on `bare`, the build's bare engine's logits for those inputs (so that the
    twin's digest is computed from the very logits the engine's subgraph sees, FP16 ones included)."""
    import torch

    from aim.graph_passes.redistribution import redistribute_torch

    knobs = torch.from_numpy(reference.utility), torch.from_numpy(reference.focus)
    return redistribute_torch(torch.from_numpy(bare), *knobs, class_axis=class_axis, key=key).numpy()


@contextmanager
def computing_in_fp32(model):
    """`model` (stored in bf16 or fp16) computes in FP32 while inside, without an FP32 copy of itself:
    each module with weights of its own has them upcast just before it runs and restored just after, so
    memory holds one module's FP32 weights at a time (the largest: the embedding or the head). The
    reference an FP16 graph is held to: its bf16 weights with FP32 arithmetic differ from an FP32 model's
    by ~1e-6, where bf16 arithmetic would differ by ~1e-2 (docs/real-sizes.md)."""
    import torch

    saved: dict[int, list] = {}

    def upcast(module, args, kwargs):
        saved[id(module)] = [(p, p.data) for p in module.parameters(recurse=False) if p.is_floating_point()]
        for parameter, data in saved[id(module)]:
            parameter.data = data.float()
        cast = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
        return cast, kwargs

    def restore(module, args, kwargs, output):
        for parameter, data in saved.pop(id(module), []):
            parameter.data = data

    hooks = []
    for module in model.modules():
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters(recurse=False)):
            hooks.append(module.register_forward_pre_hook(upcast, with_kwargs=True))
            hooks.append(module.register_forward_hook(restore, with_kwargs=True, always_call=True))
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
