"""Model families: one small registered record per architecture, stating only what differs from its task.

A family says which transformers class it is, which task it serves (by the task's name), the tiny
random-weight config `make engine` builds without a checkpoint, and the sizes it is trained and
benchmarked at. Everything else it inherits from its task (aim/tasks): the ranges of the dynamic
dims, the sizes it is verified at, the tolerance, the FP16 comparator and the opset, as Optimum's
architecture configs inherit their task's (`ResNetOnnxConfig(ViTOnnxConfig): pass`); a family states
a dim, a size or a comparator only where its architecture differs. Adding a family is adding one
module here that calls `register(...)`; nothing outside this package names one. A checkpoint folder
of any supported architecture needs no family module: its record is derived from its config.json
(architectures.py, from_checkpoint.py) and inherits the same defaults. transformers is imported only
when a model is built.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aim.errors import UnknownModelError
from aim.specs import DimRange
from aim.tasks import get_task
from aim.verdicts import Agreement, Tolerance

if TYPE_CHECKING:
    from aim.families.architectures import Architecture


@dataclass(frozen=True)
class Trained:
    """The family's small model trained on its task's package-shipped data (make train / eval / calibrate)."""

    # The transformers config to train from scratch, given what the task's data needs (image tasks
    # pass `labels` (class names) and `channels`; text generation passes nothing).
    config: Callable[..., object]
    steps: int  # optimiser steps of a full training
    lr: float
    batch: int
    version: int  # bumped when the data or recipe changes, so that cached checkpoints are retrained
    # Evaluation: rows per engine call, repeats per sweep point (so that every point has several
    # thousand samples), and how many inputs of the test split (None: all).
    eval_batch: int = 64
    eval_repeats: int = 1
    eval_inputs: int | None = None


@dataclass(frozen=True)
class Benchmark:
    """The realistic size `make bench` measures the family at (random weights: no hub)."""

    config: Callable[[], object]
    sizes: dict[str, int]  # every dynamic dim
    shape: str  # what it is, for the bench table (docs/results.md)
    repeats: int = 10  # interleaved rounds before the first look, after warm-up (more while unresolved)
    time_make_engine: bool = False  # "make engine wall time": `make engine` of this family is timed end to end
    # The bound on "latency with noise / bare" (utility > 0 over the bare model). The noise of a
    # logits tensor as big as the image (segmentation) costs more than a small head's.
    noise_latency_bound: float = 1.03


@dataclass(frozen=True)
class Family:
    name: str
    task: str  # the name of a task in aim.tasks, whose defaults the family inherits
    model_class: str  # the transformers class that loads a checkpoint, by name
    # The transformers config of the tiny random-weight model; None for a record derived from a
    # checkpoint folder (from_checkpoint.py), which always loads its weights.
    tiny: Callable[[], object] | None
    model_type: str = ""  # config.json's model_type of this architecture; the family's name if not stated
    # What differs from the task's defaults; after construction each holds the whole fact (the task's
    # merged with what the family states):
    # ranges of the dynamic dims (export example, tests and TensorRT profiles use them), per dim;
    dims: dict[str, DimRange] = field(default_factory=dict)
    # small sizes for tracing and for the verification run of `make engine`, per dim (dims that are
    # dynamic get different values, so that no two of them can be mistaken for each other);
    verify_sizes: dict[str, int] = field(default_factory=dict)
    tolerance: Tolerance | None = None  # fp32, engine vs PyTorch
    fp16: Agreement | None = None  # FP16 engines: the comparator against FP32 PyTorch
    opset: int | None = None
    fp16_keep_fp32: tuple[str, ...] = ()  # node-name prefixes kept FP32 in FP16 graphs (besides the task's)
    trained: Trained | None = None
    benchmark: Benchmark | None = None
    # The transformers config of a real-size checkpoint (`make scale-check` saves it in bf16, sharded,
    # and builds it), or None.
    scale: Callable[[], object] | None = None
    # A record derived from a checkpoint folder: the architecture it holds.
    architecture: Architecture | None = None

    def __post_init__(self):
        """The task's defaults under what the family states (an unknown task is an UnknownModelError)."""
        task = get_task(self.task)
        inherited = {
            "model_type": self.model_type or self.name,
            "dims": {**task.dims, **self.dims},
            "verify_sizes": {**task.verify_sizes, **self.verify_sizes},
            "tolerance": self.tolerance or task.tolerance,
            "fp16": self.fp16 or task.fp16,
            "opset": self.opset or task.opset,
        }
        for name, value in inherited.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    def model_class_object(self):
        import transformers

        return getattr(transformers, self.model_class)

    def build(self, config=None):
        """A model of this family with random weights from `config` (default: the tiny one)."""
        if config is None and self.tiny is None:
            raise UnknownModelError(f"{self.name} has no built-in tiny model: it is built from its checkpoint folder")
        return self.model_class_object()(config if config is not None else self.tiny())

    def sizes(self, **overrides: int) -> dict[str, int]:
        """A size for every dynamic dim: the profile's opt, unless overridden; unknown names are an error."""
        unknown = set(overrides) - set(self.dims)
        if unknown:
            raise ValueError(f"{self.name} has no dynamic dims {sorted(unknown)}; it has {sorted(self.dims)}")
        return {**{k: r.opt for k, r in self.dims.items()}, **overrides}


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _REGISTRY:
        raise ValueError(f"model family {family.name!r} registered twice")
    _REGISTRY[family.name] = family
    return family


def _load_all() -> None:
    """Imports every module of this package: each registers its family (no list to keep in step;
    architectures.py registers none, it is the table of what checkpoint folders may hold)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def list_families() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_family(name: str) -> Family:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        names = list_families()
        raise UnknownModelError(
            f"unknown model {name!r}. Models that exist: {', '.join(names)}. Use one of them, e.g. `make "
            f"engine MODEL={names[0]}`."
        ) from None
