"""The two interpreters of the redistribution's statement (`redistribution.redistribute`).

`TorchOps` evaluates each op eagerly in PyTorch (the twin, the reference of every check); `GraphOps`
appends each op to an ONNX graph through one emitter, `GraphOps.node`, which names every node and
tensor under PREFIX. An op is a method of both, with the same meaning: the noise sources
(graph_passes/noise.py) are written against them too, so the twin and the graph cannot drift apart.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from aim.contract import PREFIX
from aim.lazy import lazy_import

torch = lazy_import("torch")  # TorchOps only: emitting the graph needs no torch


class TorchOps:
    """`redistribute` evaluated eagerly; `if_` is a plain Python branch."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    @staticmethod
    def unsqueeze(x, axes):
        for axis in sorted(axes):
            x = x.unsqueeze(axis)
        return x

    @staticmethod
    def nan_to(x, value: float):
        return torch.where(torch.isnan(x), torch.full_like(x, value), x)

    @staticmethod
    def minimum(x, bound: float):
        return torch.clamp(x, max=bound)

    @staticmethod
    def clip(x, low: float, high: float):
        return torch.clamp(x, low, high)

    @staticmethod
    def reduce_max(x, axis: int | None = None):
        return x.max() if axis is None else x.amax(dim=axis)

    @staticmethod
    def greater(x, value):
        return x > value

    @staticmethod
    def less(x, value):
        return x < value

    @staticmethod
    def equal(x, value):
        return x == value

    @staticmethod
    def and_(a, b):
        return torch.logical_and(a, b)

    @staticmethod
    def if_(condition, then_branch, else_branch):
        return then_branch() if bool(condition) else else_branch()

    @staticmethod
    def focused(focusing):
        return torch.nonzero(focusing.amax(dim=0) > 0).flatten()

    @staticmethod
    def gather(x, indices, axis: int):
        return torch.index_select(x, axis, indices)

    @staticmethod
    def scatter(x, indices, updates, axis: int, rank: int):
        return x.index_copy(axis, indices, updates)

    scatter_classes = scatter  # GraphOps' differ only in the nodes they emit

    @staticmethod
    def min_of(a, b):
        return torch.minimum(a, b)

    def to_float32(self, x):
        return x.float()

    def to_logits_dtype(self, x):
        return x.to(self.dtype)

    @staticmethod
    def mul(a, b):
        return torch.mul(a, b)

    @staticmethod
    def add(a, b):
        return torch.add(a, b)

    @staticmethod
    def abs(x):
        return torch.abs(x)

    @staticmethod
    def or_(a, b):
        return torch.logical_or(a, b)

    # -- keyed noise (noise.KeyedNoise)

    @staticmethod
    def constant(value, dtype=np.float32):
        return torch.from_numpy(np.array(value, dtype=dtype))

    @staticmethod
    def sub(a, b):
        return torch.sub(a, b)

    @staticmethod
    def div(a, b):
        return torch.div(a, b)

    @staticmethod
    def mod(a, b):
        return torch.remainder(a, b)

    @staticmethod
    def matmul(a, b):
        return torch.matmul(a, b)

    @staticmethod
    def where(condition, a, b):
        return torch.where(condition, a, b)

    @staticmethod
    def floor(x):
        return torch.floor(x)

    @staticmethod
    def to_int64(x):
        return x.to(torch.int64)

    @staticmethod
    def reduce_mean(x, axes: list[int], keepdims: bool = False):
        return x.mean(dim=axes, keepdim=keepdims)

    @staticmethod
    def reduce_sum(x, axes: list[int], keepdims: bool = False):
        return x.sum(dim=axes, keepdim=keepdims)

    @staticmethod
    def concat(tensors, axis: int):
        return torch.cat(tensors, dim=axis)

    @staticmethod
    def slice(x, start: int, end: int, axis: int):
        return x.narrow(axis, start, end - start)

    @staticmethod
    def on_axis(x, axis: int, rank: int):
        return x.reshape([x.numel() if a == axis else 1 for a in range(rank)])

    @staticmethod
    def arange(z, axis: int, extra: int = 0):
        return torch.arange(z.shape[axis] + extra, dtype=torch.int64)

    @staticmethod
    def positions(z, class_axis: int, rank: int):
        shape = [1 if a in (0, class_axis) else z.shape[a] for a in range(rank)]
        return torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)

    @staticmethod
    def count_below(values, bound: int):
        return (values < bound).sum().reshape(1)

    @staticmethod
    def slice_between(x, start, end, axis: int):
        first = int(start)
        return x.narrow(axis, first, int(end) - first)

    @staticmethod
    def log(x):
        return torch.log(x)

    @staticmethod
    def sqrt(x):
        return torch.sqrt(x)

    @staticmethod
    def cos(x):
        return torch.cos(x)

    @staticmethod
    def sin(x):
        return torch.sin(x)


class GraphOps:
    """Appends ONNX nodes to the graph being built (the main graph or an If branch); every node and
    tensor is named under PREFIX, with one counter, so names are unique across all (sub)graphs."""

    def __init__(self, graph: gs.Graph, logits_dtype, num_classes: int):
        self.graph = graph
        self.classes = num_classes
        self.opset = graph.opset
        self.logits_dtype = np.dtype(logits_dtype)
        self.count = 0

    def unique(self, base: str) -> str:
        """`base` with this builder's next number: unique across the graph and its branches."""
        self.count += 1
        return f"{base}_{self.count}"

    def name(self, what: str) -> str:
        return self.unique(f"{PREFIX}/{what}")

    def node(self, op: str, inputs: list, attrs: dict | None = None, dtype=np.float32) -> gs.Variable:
        name = self.name(op)
        out = gs.Variable(f"{name}/output", dtype=dtype)
        self.graph.nodes.append(gs.Node(op, name=name, inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    def constant(self, value, dtype=np.float32) -> gs.Constant:
        return gs.Constant(self.name("constant"), np.array(value, dtype=dtype))

    def unsqueeze(self, x, axes):
        if not axes:
            return x
        return self.node("Unsqueeze", [x, self.constant(axes, np.int64)], dtype=x.dtype)

    def nan_to(self, x, value: float):
        return self.node("Where", [self.node("IsNaN", [x], dtype=bool), self.constant(value), x])

    def minimum(self, x, bound: float):
        return self.node("Min", [x, self.constant(bound)])

    def clip(self, x, low: float, high: float):
        return self.node("Clip", [x, self.constant(low), self.constant(high)])

    def reduce_max(self, x, axis: int | None = None):
        return self.reduce("ReduceMax", x, None if axis is None else [axis])

    def reduce(self, op: str, x, axes: list[int] | None, keepdims: bool = False):
        if axes is None:  # no axes: every axis, in every opset
            return self.node(op, [x], {"keepdims": int(keepdims)}, dtype=x.dtype)
        if self.opset >= 18:  # axes moved from an attribute to an input in opset 18
            return self.node(op, [x, self.constant(axes, np.int64)], {"keepdims": int(keepdims)}, dtype=x.dtype)
        return self.node(op, [x], {"keepdims": int(keepdims), "axes": axes}, dtype=x.dtype)

    def _operand(self, value):
        """A number as an FP32 constant; a tensor as it is."""
        return self.constant(value) if isinstance(value, (int, float)) else value

    def greater(self, x, value):
        return self.node("Greater", [x, self._operand(value)], dtype=bool)

    def less(self, x, value):
        return self.node("Less", [x, self._operand(value)], dtype=bool)

    def equal(self, x, value):
        return self.node("Equal", [x, self._operand(value)], dtype=bool)

    def and_(self, a, b):
        return self.node("And", [a, b], dtype=bool)

    def or_(self, a, b):
        return self.node("Or", [a, b], dtype=bool)

    def mul(self, a, b):
        return self.node("Mul", [a, b], dtype=a.dtype)

    def add(self, a, b):
        return self.node("Add", [a, b], dtype=a.dtype)

    def abs(self, x):
        return self.node("Abs", [x])

    # -- keyed noise (noise.KeyedNoise)

    def sub(self, a, b):
        return self.node("Sub", [a, b], dtype=a.dtype)

    def div(self, a, b):
        return self.node("Div", [a, b], dtype=a.dtype)

    def mod(self, a, b):
        return self.node("Mod", [a, b], dtype=a.dtype)  # integers: fmod=0, Python's sign (all >= 0 here)

    def matmul(self, a, b):
        return self.node("MatMul", [a, b])

    def where(self, condition, a, b):
        return self.node("Where", [condition, a, b], dtype=a.dtype)

    def floor(self, x):
        return self.node("Floor", [x])

    def to_int64(self, x):
        return self.cast(x, np.int64)

    def reduce_mean(self, x, axes: list[int], keepdims: bool = False):
        return self.reduce("ReduceMean", x, axes, keepdims)

    def reduce_sum(self, x, axes: list[int], keepdims: bool = False):
        # ReduceSum took its axes as an input from opset 13 (the others from 18); the passes need 15.
        return self.node("ReduceSum", [x, self.constant(axes, np.int64)], {"keepdims": int(keepdims)}, dtype=x.dtype)

    def concat(self, tensors, axis: int):
        return self.node("Concat", list(tensors), {"axis": axis}, dtype=tensors[0].dtype)

    def slice(self, x, start: int, end: int, axis: int):
        i64 = np.int64
        return self.node(
            "Slice",
            [x, self.constant([start], i64), self.constant([end], i64), self.constant([axis], i64)],
            dtype=x.dtype,
        )

    def on_axis(self, x, axis: int, rank: int):
        """A vector [J] laid along `axis` of a rank-`rank` tensor: [1, .., J, .., 1]."""
        return self.node(
            "Reshape", [x, self.constant([-1 if a == axis else 1 for a in range(rank)], np.int64)], dtype=x.dtype
        )

    def arange(self, z, axis: int, extra: int = 0):
        """0, 1, .., z.shape[axis] + extra - 1 (int64) from z's shape at run time: a range of constant
        size would be folded into the engine file, 8 bytes per class."""
        i64 = np.int64
        size = self.node("Shape", [z], {"start": axis, "end": axis + 1}, dtype=i64)
        limit = self.node("Squeeze", [self.add(size, self.constant([extra], i64)), self.constant([0], i64)], dtype=i64)
        return self.node("Range", [self.constant(0, i64), limit, self.constant(1, i64)], dtype=i64)

    def positions(self, z, class_axis: int, rank: int):
        """Each element's row-major index among the axes other than the batch and the classes: int64
        shaped like `z` with those two axes 1 (dynamic sizes: Shape, ReduceProd, Range, Reshape)."""
        i64 = np.int64
        kept = [0 if a in (0, class_axis) else 1 for a in range(rank)]
        shape = self.node("Shape", [z], dtype=i64)
        dims = self.add(self.mul(shape, self.constant(kept, i64)), self.constant([1 - k for k in kept], i64))
        count = self.reduce("ReduceProd", dims, [0])
        flat = self.node("Range", [self.constant(0, i64), count, self.constant(1, i64)], dtype=i64)
        return self.node("Reshape", [flat, dims], dtype=i64)

    def count_below(self, values, bound: int):
        """[1] int64: how many of the int64 `values` [K] are below `bound` (0 for no values)."""
        below = self.cast(self.node("Less", [values, self.constant(bound, np.int64)], dtype=bool), np.int64)
        return self.node("ReduceSum", [below, self.constant([0], np.int64)], {"keepdims": 1}, dtype=np.int64)

    def slice_between(self, x, start, end, axis: int):
        """`x` from `start` to `end` on `axis`, bounds known at run time ([1] int64 tensors)."""
        return self.node("Slice", [x, start, end, self.constant([axis], np.int64)], dtype=x.dtype)

    def log(self, x):
        return self.node("Log", [x])

    def sqrt(self, x):
        return self.node("Sqrt", [x])

    def cos(self, x):
        return self.node("Cos", [x])

    def sin(self, x):
        return self.node("Sin", [x])

    def focused(self, focusing):
        """The classes [K] (int64, in order) that some row of `focusing` [B, C] (1.0 or 0.0) marks, without
        NonZero (TensorRT for RTX lacks it) or TopK (K <= 3840 in TensorRT): each focused class's rank among
        the focused (a CumSum, 1..K) is its slot; the others all write to slot 0, which is dropped.

        The ranks take passes over every class (CumSum and ScatterElements cost ONNX Runtime ~0.15 ms each
        over 49,152 classes, a few % of a 135M model's decode step), so they run over the first
        max(1, C * [some row focuses]) classes: over one when no row focuses, the usual request."""
        i64, f32 = np.int64, onnx.TensorProto.FLOAT
        some = self.cast(self.reduce("ReduceMax", focusing, None), i64)  # [] 1 if any row focuses
        size = self.node(
            "Max", [self.mul(some, self.constant([self.classes], i64)), self.constant([1], i64)], dtype=i64
        )
        part = self.slice_to(focusing, size, axis=1)  # [B, size]
        rows = self.node(
            "ConstantOfShape",
            [self.node("Shape", [focusing], {"end": 1}, dtype=i64)],
            {"value": onnx.helper.make_tensor("value", f32, [1], [1.0])},
        )  # [B] of 1.0
        # How many rows focus on each class (a MatMul: a ReduceMax over the batch axis takes ONNX Runtime
        # ~20 times longer), 1.0 where any does. Exact: counts below 2**24.
        chosen = self.node("Min", [self.matmul(rows, part), self.constant(1.0)])  # [size]
        # CumSum in FP32 (TensorRT's CumSum takes floating point), exact for counts below 2**24.
        running = self.node("CumSum", [chosen, self.constant(0, np.int32)])
        count = self.cast(self.reduce("ReduceSum", chosen, None, keepdims=True), i64)  # [1]
        slot = self.cast(self.mul(running, chosen), i64)  # a focused class's rank 1..K, 0 for the others
        end = self.node("Add", [count, self.constant([1], i64)], dtype=i64)
        slots = self.node(
            "ConstantOfShape",
            [end],
            {"value": onnx.helper.make_tensor("value", onnx.TensorProto.INT64, [1], [0])},
            dtype=i64,
        )
        limit = self.node("Squeeze", [size, self.constant([0], i64)], dtype=i64)
        every = self.node("Range", [self.constant(0, i64), limit, self.constant(1, i64)], dtype=i64)  # [size]
        placed = self.node("ScatterElements", [slots, slot, every], {"axis": 0}, dtype=i64)
        return self.node("Slice", [placed, self.constant([1], i64), end, self.constant([0], i64)], dtype=i64)

    def slice_to(self, x, end, axis: int):
        """x[..., :end] on `axis`, `end` an int64 [1] tensor computed at run time."""
        i64 = np.int64
        return self.node("Slice", [x, self.constant([0], i64), end, self.constant([axis], i64)], dtype=x.dtype)

    def gather(self, x, indices, axis: int):
        return self.node("Gather", [x, indices], {"axis": axis}, dtype=x.dtype)

    def scatter(self, x, indices, updates, axis: int, rank: int):
        # ScatterElements wants indices shaped like the updates: [K] placed on `axis`, expanded.
        shape = [-1 if a == axis else 1 for a in range(rank)]
        placed = self.node("Reshape", [indices, self.constant(shape, np.int64)], dtype=np.int64)
        full = self.node("Expand", [placed, self.node("Shape", [updates], dtype=np.int64)], dtype=np.int64)
        return self.node("ScatterElements", [x, full, updates], {"axis": axis}, dtype=x.dtype)

    def scatter_classes(self, x, places, updates, axis: int, rank: int):
        """`x` with updates[:, k] written as class places[k] of every row. On axis 1 by ScatterND over
        (row, class) pairs, which writes whole class maps at memcpy speed but copies `x` (ONNX Runtime runs
        it out of place), where ScatterElements, in place, takes ~25 ns an element: for a focused class
        of a 512 x 512 map, 7 ms against ScatterND's 1 ms (copy included) on a block of 5 classes."""
        if axis != 1:
            return self.scatter(x, places, updates, axis, rank)
        i64 = np.int64
        pairs = self.node("Shape", [updates], {"end": 2}, dtype=i64)  # [B, K]
        rows = self.node(
            "Range",
            [
                self.constant(0, i64),
                self.node(
                    "Squeeze", [self.node("Shape", [x], {"end": 1}, dtype=i64), self.constant([0], i64)], dtype=i64
                ),
                self.constant(1, i64),
            ],
            dtype=i64,
        )
        rows = self.node("Expand", [self.unsqueeze(rows, [1]), pairs], dtype=i64)
        columns = self.node("Expand", [self.unsqueeze(places, [0]), pairs], dtype=i64)
        indices = self.concat([self.unsqueeze(rows, [2]), self.unsqueeze(columns, [2])], axis=2)  # [B, K, 2]
        return self.node("ScatterND", [x, indices, updates], dtype=x.dtype)

    def min_of(self, a, b):
        return self.node("Min", [a, b], dtype=a.dtype)

    def if_(self, condition, then_branch, else_branch):
        branches = {}
        for label, build in (("then_branch", then_branch), ("else_branch", else_branch)):
            outer, self.graph = self.graph, gs.Graph(name=self.name(label), opset=self.opset)
            try:
                out = build()
                if not any(out in node.outputs for node in self.graph.nodes):
                    out = self.node("Identity", [out], dtype=out.dtype)  # a branch returns its own tensor
                self.graph.outputs = [out]
                branches[label] = self.graph
            finally:
                self.graph = outer
        then_out, else_out = branches["then_branch"].outputs[0], branches["else_branch"].outputs[0]
        out = self.node("If", [condition], branches, dtype=then_out.dtype)
        out.shape = then_out.shape if then_out.shape == else_out.shape else None
        return out

    def to_float32(self, x):
        return x if x.dtype == np.float32 else self.cast(x, np.float32)

    def to_logits_dtype(self, x):
        return x if self.logits_dtype == np.float32 else self.cast(x, self.logits_dtype)

    def cast(self, x, dtype):
        out = self.node("Cast", [x], {"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}, dtype=dtype)
        out.shape = x.shape
        return out
