"""The shape of a model family's export config, and the registry of families.

Like Optimum's OnnxConfig: one declarative object per family says how to build the model, what its
inputs and dynamic axes are, which output holds the logits and on which axis the classes lie. Adding
a family means adding one module that calls `register(...)`; nothing in the pipeline names a family.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

from errors import UnknownModelError


@dataclass(frozen=True)
class DimRange:
    """A dynamic dimension's range: TensorRT's optimization profile (min, opt, max)."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: a name, a dtype and dims that are ints (static) or names (dynamic)."""

    name: str
    dtype: str
    dims: tuple[int | str | None, ...]  # None: static, set by the model (channels, classes)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}


@dataclass(frozen=True)
class Tolerance:
    """Element-wise: an element passes if |a-b| <= atol or |a-b| <= rtol * |b| (Polygraphy's rule)."""

    atol: float
    rtol: float
    why: str


@dataclass(frozen=True)
class Agreement:
    """Reduced-precision check of a task: FP16 logits cannot match FP32 element-wise, so compare what the
    task reads from them. metric "top_k": mean overlap of the top-k class sets per sample (image
    classes, next-token candidates); "class_map": fraction of pixels whose argmax class agrees.
    Passes when the agreement is at least `min_fraction`."""

    metric: str
    k: int
    min_fraction: float
    why: str


@dataclass(frozen=True)
class ExportConfig:
    name: str
    task: str
    # Builds the family's model with random weights from a tiny config (seeded by the caller).
    build_tiny: Callable[[], "object"]
    # The transformers class whose from_pretrained loads a local checkpoint folder.
    model_class: type
    # Wraps the HF model into a module whose positional args are `inputs` and whose output is the logits.
    wrap: Callable[["object"], "object"]
    # Example inputs for given dynamic sizes: (model, sizes, torch.Generator) -> {name: tensor}.
    make_inputs: Callable[["object", dict, "object"], dict]
    inputs: tuple[TensorSpec, ...]
    logits: TensorSpec
    class_axis: int
    # Number of classes of a built model (num_labels, vocab_size, ...).
    num_classes: Callable[["object"], int]
    # Ranges of the dynamic dims: export example, tests and TensorRT profiles use them.
    dims: dict[str, DimRange]
    # Fp32 tolerance of engine vs PyTorch, per family.
    tolerance: Tolerance
    # Input whose spatial size the logits are resized to before modulation (segmentation).
    upsample_logits_to: str | None = None
    # Patches needed while tracing (e.g. traceable attention masks for Llama).
    export_context: Callable[[], ContextManager] = contextlib.nullcontext
    opset: int = 17
    # Small sizes for tracing and for the verification run of `make engine`; dims that are dynamic
    # get different values, so that no two of them can be mistaken for each other.
    verify_sizes: dict[str, int] = field(default_factory=dict)
    # FP16 engines: the task's comparator against the FP32 PyTorch reference (None: no FP16 build).
    fp16: Agreement | None = None
    # Node-name prefixes that stay FP32 in FP16 graphs besides the redistribution subgraph.
    fp16_keep_fp32: tuple[str, ...] = ()

    def sizes(self, **overrides: int) -> dict[str, int]:
        """A size for every dynamic dim: the profile's opt, unless overridden; unknown names are an error."""
        unknown = set(overrides) - set(self.dims)
        if unknown:
            raise ValueError(f"{self.name} has no dynamic dims {sorted(unknown)}; it has {sorted(self.dims)}")
        return {**{k: r.opt for k, r in self.dims.items()}, **overrides}


_REGISTRY: dict[str, ExportConfig] = {}


def register(config: ExportConfig) -> ExportConfig:
    if config.name in _REGISTRY:
        raise ValueError(f"model family {config.name!r} registered twice")
    _REGISTRY[config.name] = config
    return config


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str) -> ExportConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}. Models that exist: {', '.join(list_models())}. "
            f"Use one of them, e.g. `make engine MODEL={list_models()[0]}`."
        ) from None
