"""What a verification judges by and what it concludes: element-wise tolerances, a task's
reduced-precision comparator, the weight-only quantization check, and the verdict of one check.
Plain dataclasses, no dependencies."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
class Quantization:
    """Weight-only int4 / int8 check (aim/verify/quantized.py): the engine against a reference that
    multiplies by the same quantized weights, dequantized (what the engine is meant to compute), so the
    check sees the kernels' own error (int8 activations, accumulation order), not what quantizing did to
    the model; that is reported beside it as a figure. Passes when the median relative logit error (per
    position: |e - mean e| / |r - mean r| over the classes) is at most `max_relative_error`, and the
    top-1 class agrees wherever the reference's top-1 margin exceeds `margin_sigmas` x sigma (sigma: the
    std of the centred error over every logit compared)."""

    bits: int
    max_relative_error: float
    margin_sigmas: float
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
