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
