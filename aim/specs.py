"""What a graph's tensors are: names, dtypes, and dynamic dims with their ranges. Plain dataclasses,
no dependencies: a family, a task, the exporter and the manifest all speak them."""

from __future__ import annotations

from dataclasses import dataclass


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
