"""Resize logits to the input's spatial size (bilinear), so modulation acts per input pixel (docs/method.md §2).

The ONNX Resize (linear, half_pixel) and its PyTorch twin (F.interpolate, bilinear,
align_corners=False, as transformers' SegFormer post-processor does) compute the same thing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from aim.errors import InvalidGraphError
from aim.graph_passes.logits import logits_output

PREFIX = "aim_upsample"


def upsample_logits(graph: gs.Graph, logits: str = "logits", like: str = "pixel_values") -> gs.Graph:
    """Resizes output `logits` [B, C, h, w] to the spatial size of tensor `like` [B, *, H, W]; the
    output keeps its name. Sizes are read at run time, so dynamic image sizes keep working."""
    z = logits_output(graph, logits)
    tensors = graph.tensors()
    if like not in tensors:
        raise InvalidGraphError(
            f"cannot upsample to {like!r}: the graph has no such tensor (inputs: {[t.name for t in graph.inputs]})"
        )
    reference = tensors[like]
    if z.shape is None or reference.shape is None or len(z.shape) != len(reference.shape) or len(z.shape) < 3:
        raise InvalidGraphError(
            f"upsampling needs logits [B, C, spatial...] and {like!r} of the same rank; "
            f"got {z.shape} and {reference.shape}"
        )
    rank = len(z.shape)
    shape, dtype = list(z.shape), z.dtype
    z.name = f"{PREFIX}/{logits}_lowres"

    def shape_slice(tensor, start, end, name):
        out = gs.Variable(f"{PREFIX}/{name}", dtype=np.int64, shape=[end - start])
        graph.nodes.append(
            gs.Node(
                "Shape",
                name=f"{PREFIX}/Shape_{name}",
                inputs=[tensor],
                outputs=[out],
                attrs={"start": start, "end": end},
            )
        )
        return out

    sizes = gs.Variable(f"{PREFIX}/sizes", dtype=np.int64, shape=[rank])
    graph.nodes.append(
        gs.Node(
            "Concat",
            name=f"{PREFIX}/Concat",
            inputs=[shape_slice(z, 0, 2, "batch_classes"), shape_slice(reference, 2, rank, "spatial")],
            outputs=[sizes],
            attrs={"axis": 0},
        )
    )
    out = gs.Variable(logits, dtype=dtype, shape=[shape[0], shape[1], *reference.shape[2:]])
    graph.nodes.append(
        gs.Node(
            "Resize",
            name=f"{PREFIX}/Resize",
            inputs=[z, gs.Variable.empty(), gs.Variable.empty(), sizes],
            outputs=[out],
            attrs={"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
        )
    )
    graph.outputs = [out if tensor is z else tensor for tensor in graph.outputs]
    return graph.cleanup().toposort()


def upsample_torch(logits, size):
    """The PyTorch twin of `upsample_logits`."""
    import torch.nn.functional as F

    return F.interpolate(
        logits, size=tuple(size), mode="bilinear" if logits.dim() == 4 else "linear", align_corners=False
    )


def class_separable(node: gs.Node) -> bool:
    """Whether `node` is a Resize that keeps its input's batch and class sizes, as upsample_logits makes it
    (sizes: its input's first two dims, then the spatial ones): each class is resized alone, so resizing a
    block of classes gives exactly that block of its output."""
    if node.op != "Resize" or "axes" in node.attrs or len(node.inputs) != 4:
        return False
    data, roi, scales, sizes = node.inputs
    if roi.name or scales.name or len(sizes.inputs) != 1 or sizes.inputs[0].op != "Concat":
        return False
    head = sizes.inputs[0].inputs[0]
    shape = head.inputs[0] if len(head.inputs) == 1 else None
    return (
        shape is not None
        and shape.op == "Shape"
        and shape.inputs[0] is data
        and shape.attrs.get("start", 0) == 0
        and shape.attrs.get("end") == 2
    )


def resize_classes(ops, node: gs.Node, start: int, stop: int, rank: int):
    """The output of `node` (class_separable) for classes [start, stop) only: the same Resize of those
    classes of its input, with sizes whose class entry is stop - start."""
    data, _, _, sizes = node.inputs
    i64 = np.int64
    keep = ops.constant([0 if axis == 1 else 1 for axis in range(rank)], i64)
    count = ops.constant([stop - start if axis == 1 else 0 for axis in range(rank)], i64)
    block_sizes = ops.node("Add", [ops.node("Mul", [sizes, keep], dtype=i64), count], dtype=i64)
    block = ops.slice(data, start, stop, axis=1)
    name = ops.unique(f"{node.name or node.op}/classes_{start}_{stop}")
    out = gs.Variable(f"{name}/output", dtype=data.dtype)
    empty = gs.Variable.empty()
    ops.graph.nodes.append(
        gs.Node("Resize", name=name, attrs=dict(node.attrs), inputs=[block, empty, empty, block_sizes], outputs=[out])
    )
    return out
