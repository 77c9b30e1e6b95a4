"""Small records shared by every layer: tensors and their dynamic dims, tolerances, comparators and
the result of one check. Plain dataclasses, no dependencies: a family, a task, the manifest and the
verifier all speak them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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


@dataclass
class Check:
    """One verdict of a verification: what was checked, whether it passed, and the numbers behind it."""

    name: str
    passed: bool
    detail: str
    metrics: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)
