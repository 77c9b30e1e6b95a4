"""The logits output a pass splices onto: found by name and checked (a user's graph may name the wrong
output), its class axis, and whether the node computing it may move into the redistribution's branches."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from aim.errors import InvalidGraphError

MAX_MOVED_CONSTANT = 64 * 1024  # bytes: see movable_producer


def logits_output(graph: gs.Graph, logits: str) -> gs.Variable:
    outputs = {tensor.name: tensor for tensor in graph.outputs}
    if logits not in outputs:
        raise InvalidGraphError(
            f"the graph has no output named {logits!r}; its outputs are {sorted(outputs)}. "
            f"Pass the name of the logits output (--logits NAME)."
        )
    z = outputs[logits]
    if z in graph.inputs:
        raise InvalidGraphError(
            f"output {logits!r} is also a graph input (passed straight through): modulating it would rename the input "
            f"that clients send. Pass the name of the output the model computes its logits into (--logits NAME)."
        )
    if z.dtype is not None and (np.issubdtype(np.dtype(z.dtype), np.integer) or np.dtype(z.dtype) == np.bool_):
        raise InvalidGraphError(
            f"output {logits!r} is {np.dtype(z.dtype).name}: it holds class ids or flags, not logits, and "
            "noise added to "
            "them would change the ids. Pass the floating-point output the model computes its scores into "
            "(--logits NAME)."
        )
    return z


def normalised_class_axis(name: str, shape, class_axis: int) -> int:
    """The class axis as a non-negative index, one of the axes past the batch (axis 0)."""
    rank = len(shape)
    axis = class_axis + rank if class_axis < 0 else class_axis
    if rank < 2 or not 1 <= axis < rank:
        raise InvalidGraphError(
            f"class axis {class_axis} is out of range for logits {name!r} of shape {list(shape)}: "
            f"axis 0 is the batch, so the class axis must be one of 1..{rank - 1} (or -1..{1 - rank})."
        )
    return axis


def class_axis_of(z: gs.Variable, class_axis: int) -> tuple[int, int]:
    """Normalised class axis and the number of classes; the batch is axis 0."""
    if z.shape is None:
        raise InvalidGraphError(
            f"the rank of {z.name!r} is unknown; run ONNX shape inference or export with output shapes"
        )
    axis = normalised_class_axis(z.name, z.shape, class_axis)
    classes = z.shape[axis]
    if not isinstance(classes, int) or classes <= 0:
        raise InvalidGraphError(
            f"the class axis {class_axis} of {z.name!r} (shape {list(z.shape)}) has no static size; "
            f"focus needs a known number of classes. Export with a fixed number of classes."
        )
    return axis, classes


def _nbytes(constant: gs.Constant) -> int:
    return int(np.prod(constant.shape, dtype=np.int64)) * np.dtype(constant.dtype).itemsize


def movable_producer(graph: gs.Graph, z: gs.Variable) -> gs.Node | None:
    """The node computing the logits, if nothing else needs it: then it can be computed inside the
    If's branches, and the skip branch writes the bare logits straight into the output (no copy)."""
    if len(z.inputs) != 1 or z.outputs or z in graph.inputs:
        return None
    # Reduced-precision logits stay where they are: ONNX Runtime's CPU provider runs FP16 chains it has
    # no FP16 kernels for in FP32 and rounds to FP16 only where a tensor leaves the chain (a graph output,
    # an If's input). Moved into a branch, the producer would read inputs rounded at the branch's edge,
    # which the bare graph never rounds: a third of the "exact" logits differed, mostly by one FP16 ulp.
    if np.dtype(z.dtype) != np.float32:
        return None
    producer = z.inputs[0]
    if len(producer.outputs) != 1 or producer.op in ("If", "Loop", "Scan"):
        return None
    # Weights used inside both branches would be stored twice (a classifier head: megabytes), while
    # the copy saved is only that of the small logits such heads make.
    # Sized from shape and type: a weight kept in an external data file is never read (aim/weights.py).
    if any(isinstance(t, gs.Constant) and _nbytes(t) > MAX_MOVED_CONSTANT for t in producer.inputs):
        return None
    return producer
