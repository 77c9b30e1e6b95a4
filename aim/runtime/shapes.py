"""Input shapes the way TensorRT users give them: trtexec's --minShapes / --optShapes / --maxShapes,
spelled `--min-shapes image:1x3x224x224,mask:1x224x224` here.

Each bound names inputs with their full shapes. A bound left out is filled from the others as
trtexec does for `--optShapes` alone: opt defaults to max (else min), min and max default to opt, so
one flag alone fixes the shape. From the shapes of the inputs they name, every *named* dynamic dim
gets a range (a DimRange); inputs the flags do not name (utility, focus, the verification noise)
follow their dims' names, as the families' inputs follow a family's DimRanges. A dynamic dim left
without a range is an error that names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aim.errors import AimError
from aim.runtime.base import profile_from_io
from aim.specs import DimRange

BOUNDS = ("min", "opt", "max")
FLAGS = {bound: f"--{bound}-shapes" for bound in BOUNDS}
_DIMS = re.compile(r"^\d+(x\d+)*$")


class ShapeError(AimError):
    """Shape flags that are malformed, contradict the graph, or leave a dynamic dim without a range."""


def parse_shapes(text: str | None, flag: str = "--opt-shapes") -> dict[str, list[int]]:
    """`image:1x3x224x224,mask:1x224x224` -> {"image": [1, 3, 224, 224], "mask": [1, 224, 224]}."""
    shapes: dict[str, list[int]] = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        name, colon, dims = entry.strip().rpartition(":")
        if not colon or not name or not _DIMS.match(dims):
            raise ShapeError(
                f"{flag} takes NAME:DxDxD entries separated by commas, e.g. {flag} image:1x3x224x224; got {entry!r}"
            )
        if name in shapes:
            raise ShapeError(f"{flag} gives input {name!r} twice")
        shapes[name] = [int(d) for d in dims.split("x")]
    return shapes


def _is_dynamic(dim) -> bool:
    return not (isinstance(dim, int) and dim > 0)


@dataclass(frozen=True)
class ShapeRanges:
    """min/opt/max shape of each input the flags name."""

    shapes: dict[str, dict[str, list[int]]]  # input -> {"min", "opt", "max"} -> shape

    @classmethod
    def parse(
        cls, min_shapes: str | None = None, opt_shapes: str | None = None, max_shapes: str | None = None
    ) -> ShapeRanges:
        given = {
            bound: parse_shapes(text, FLAGS[bound]) for bound, text in zip(BOUNDS, (min_shapes, opt_shapes, max_shapes))
        }
        shapes = {}
        for name in dict.fromkeys(n for bound in BOUNDS for n in given[bound]):
            low, opt, high = (given[bound].get(name) for bound in BOUNDS)
            opt = opt or high or low
            low, high = low or opt, high or opt
            if not len(low) == len(opt) == len(high):
                raise ShapeError(f"input {name!r} has shapes of different ranks: min {low}, opt {opt}, max {high}")
            if any(not a <= b <= c for a, b, c in zip(low, opt, high)) or any(c < 1 for c in high):
                raise ShapeError(
                    f"input {name!r}: need min <= opt <= max on every axis and max >= 1, got min {low}, opt "
                    f"{opt}, max {high}"
                )
            if low and low[0] < 1:  # axis 0 of every input is its batch (graph_passes/dims.py)
                raise ShapeError(
                    f"input {name!r}: the minimum batch (axis 0) is {low[0]}, but a batch holds at least one "
                    f"sample: give {FLAGS['min']} {name}:{'x'.join(map(str, [1, *low[1:]]))}"
                )
            shapes[name] = {"min": low, "opt": opt, "max": high}
        return cls(shapes)

    def __bool__(self) -> bool:
        return bool(self.shapes)

    def flags(self) -> dict[str, str]:
        """The ranges in the flags' own spelling (for the manifest and messages)."""
        return {
            bound: ",".join(f"{name}:{'x'.join(map(str, s[bound]))}" for name, s in self.shapes.items())
            for bound in BOUNDS
        }

    def dims(self, inputs) -> dict[str, DimRange]:
        """The range of every named dynamic dim of graph `inputs` (layout.Tensor), from the inputs the
        flags name; checks the flags against the graph and that every dynamic dim has a range."""
        by_name = {tensor.name: tensor for tensor in inputs}
        unknown = sorted(set(self.shapes) - set(by_name))
        if unknown:
            raise ShapeError(
                f"the shape flags name {unknown}, which {'is' if len(unknown) == 1 else 'are'} not an input of "
                f"the graph (inputs: {sorted(by_name)})"
            )
        ranges: dict[str, tuple[DimRange, str]] = {}
        for name, shapes in self.shapes.items():
            dims = by_name[name].dims
            if len(dims) != len(shapes["min"]):
                raise ShapeError(
                    f"input {name!r} has rank {len(dims)} (dims {dims}), but the shape flags give it "
                    f"{self._spelled(name)}"
                )
            for axis, dim in enumerate(dims):
                sizes = [shapes[bound][axis] for bound in BOUNDS]
                if not _is_dynamic(dim):
                    if sizes != [dim] * 3:
                        raise ShapeError(
                            f"input {name!r} axis {axis} is {dim} in the graph, but the shape flags give "
                            f"{self._spelled(name)}"
                        )
                    continue
                if not dim:
                    continue  # unnamed: only this input's explicit shapes can bound it (see profile)
                found = DimRange(*sizes)
                seen = ranges.setdefault(dim, (found, name))
                if seen[0] != found:
                    raise ShapeError(
                        f"dim {dim!r} is shared by inputs {seen[1]!r} and {name!r}, so it needs one range, but "
                        "the flags give "
                        f"{seen[0].min}..{seen[0].max} (opt {seen[0].opt}) and {found.min}..{found.max} (opt "
                        f"{found.opt})"
                    )
        found_ranges = {dim: rng for dim, (rng, _) in ranges.items()}
        for tensor in inputs:
            if tensor.name in self.shapes:
                continue
            for axis, dim in enumerate(tensor.dims):
                if _is_dynamic(dim) and dim not in found_ranges:
                    raise ShapeError(self.missing(tensor, axis))
        return found_ranges

    def profile(self, inputs) -> dict[str, dict[str, list[int]]]:
        """TensorRT's optimization profile for graph `inputs`: the flags' shapes where they name the
        input, else each dim's range by its name."""
        dims = self.dims(inputs)
        profile = {}
        for tensor in inputs:
            if tensor.name in self.shapes:
                profile[tensor.name] = {bound: list(self.shapes[tensor.name][bound]) for bound in BOUNDS}
            else:
                profile.update(profile_from_io([tensor], dims))
        return profile

    def _spelled(self, name: str) -> str:
        shapes = self.shapes[name]
        return ", ".join(f"{bound} {'x'.join(map(str, shapes[bound]))}" for bound in BOUNDS)

    @staticmethod
    def missing(tensor, axis: int) -> str:
        dim = tensor.dims[axis]
        what = f"dynamic dim {dim!r}" if dim else "a dynamic dim without a name"
        spelled = "x".join(str(d) if not _is_dynamic(d) else f"<{d or f'axis {i}'}>" for i, d in enumerate(tensor.dims))
        return (
            f"input {tensor.name!r} axis {axis} has {what}, which has no range. Give the input's shapes with "
            f"--min-shapes/--opt-shapes/--max-shapes (trtexec's spelling): {tensor.name}:{spelled} with a "
            "number for each <dim>"
        )
