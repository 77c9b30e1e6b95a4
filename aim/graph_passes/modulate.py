"""File-level entry point: an ONNX file in, a modulated ONNX file out (any model, given its logits)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from aim.errors import InvalidGraphError
from aim.graph_passes.io import load_onnx, save_onnx
from aim.graph_passes.noise_key import NoiseKey
from aim.graph_passes.redistribution import FLAVOURS, add_redistribution
from aim.graph_passes.upsample import upsample_logits

# Unsqueeze with axes as an input (13) and Shape with start/end (15) are used by the passes.
MIN_OPSET = 15
# ONNX Runtime 1.32 has RandomUniformLike and RandomNormalLike kernels up to opset 21 (opset 22 added
# bfloat16 to them): a graph of opset 22 or later with the production flavour's noise would not load.
MAX_OPSET = 21


def prepare(model: onnx.ModelProto) -> gs.Graph:
    """Upgrades old opsets and fills in output shapes, which the passes need to know the rank."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise InvalidGraphError("the model imports no standard ONNX opset")
    if opset > MAX_OPSET:
        raise InvalidGraphError(
            f"the model is opset {opset}, and ONNX Runtime has no kernels for the noise ops (RandomUniformLike, "
            f"RandomNormalLike) past opset {MAX_OPSET}: the modulated graph would not load. Export the model at opset "
            f"{MAX_OPSET} or below (torch.onnx.export(..., opset_version={MAX_OPSET})), or convert it with "
            f"onnx.version_converter.convert_version(model, {MAX_OPSET})."
        )
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as error:
            raise InvalidGraphError(
                f"opset {opset} is too old and could not be converted to {MIN_OPSET}: {error}"
            ) from error
    if any(not output.type.tensor_type.HasField("shape") for output in model.graph.output):
        model = onnx.shape_inference.infer_shapes(model)
    return gs.import_onnx(model)


def modulate_graph(
    graph: gs.Graph,
    logits: str = "logits",
    class_axis: int = 1,
    flavour: str = "production",
    upsample_to: str | None = None,
    key: NoiseKey | None = None,
    tile_maps: bool = True,
) -> gs.Graph:
    """The passes in order: optional upsampling of the logits, then the redistribution (keyed noise
    with `key`; maps in blocks of classes unless not `tile_maps`: add_redistribution)."""
    if upsample_to is not None:
        graph = upsample_logits(graph, logits, like=upsample_to)
    return add_redistribution(graph, logits, class_axis, flavour, key=key, tile_maps=tile_maps)


def deployment_graphs(
    model: onnx.ModelProto,
    logits: str = "logits",
    class_axis: int = 1,
    upsample_to: str | None = None,
    key: NoiseKey | None = None,
    tile_maps: bool = True,
) -> dict[str, gs.Graph]:
    """The bare graph (logits upsampled if asked) and both modulated flavours built on copies of it;
    with `key`, the production flavour's noise is keyed; `tile_maps`: see add_redistribution."""
    bare = prepare(model)
    if upsample_to is not None:
        bare = upsample_logits(bare, logits, like=upsample_to)
    graphs = {"bare": bare}
    for flavour in FLAVOURS:
        graphs[flavour] = add_redistribution(bare.copy(), logits, class_axis, flavour, key=key, tile_maps=tile_maps)
    return graphs


def modulate_file(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    logits: str = "logits",
    class_axis: int = 1,
    flavour: str = "production",
    upsample_to: str | None = None,
    key: NoiseKey | None = None,
) -> Path:
    """Reads `source`, splices the redistribution onto output `logits`, writes `destination` atomically."""
    graph = prepare(load_onnx(source))
    return save_onnx(
        modulate_graph(graph, logits, class_axis, flavour, upsample_to, key),
        destination,
        weights_dir=Path(source).parent,
    )
