"""The shape of a model family's export config, and the registry of families.

Like Optimum's OnnxConfig: one declarative object per family says how to build the model, what its
inputs and dynamic axes are, which output holds the logits and on which axis the classes lie. Adding
a family means adding one module that calls `register(...)`; nothing in the pipeline names a family.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

from aim.errors import UnknownModelError


@dataclass(frozen=True)
class DimRange:
    """A dynamic dimension's range: TensorRT's optimization profile (min, opt, max).

    min may be 0 where an empty tensor is meaningful: a KV cache before the first token (prefill)."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 0 <= self.min <= self.opt <= self.max or self.max < 1:
            raise ValueError(f"need 0 <= min <= opt <= max and max >= 1, got {self}")


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
    # Inputs and outputs whose number depends on the built model, after `inputs` and `logits`: a KV
    # cache has one key and one value tensor per layer. model -> (extra inputs, extra outputs).
    model_io: Callable[["object"], tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]] | None = None
    # The model's tokenizer (text families): (model, checkpoint folder or None) -> a transformers
    # tokenizer; saved with the build so that generation needs nothing else.
    tokenizer: Callable[["object", "object"], "object"] | None = None
    # Task-level verification beyond the logits (e.g. generation): `task_reference(config, model,
    # tokenizer, seed)` computes PyTorch outputs at build time (stored in reference.npz), and
    # `task_checks(engine, reference, tolerance, reduced)` checks the built engine against them (a list
    # of verify.Check; `reduced`: the fp16 Agreement when the engine is FP16, else None).
    task_reference: Callable[..., dict] | None = None
    task_checks: Callable[..., list] | None = None

    def input_specs(self, model) -> tuple[TensorSpec, ...]:
        """Every graph input of the exported model, in order (before utility and focus)."""
        return self.inputs + (self.model_io(model)[0] if self.model_io else ())

    def output_specs(self, model) -> tuple[TensorSpec, ...]:
        """Every graph output, the logits first."""
        return (self.logits,) + (self.model_io(model)[1] if self.model_io else ())

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
