"""Reading and writing ONNX files: clear errors for bad files, and no half-written artifact."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from aim.errors import InvalidGraphError
from aim.weights import save_model


def load_onnx(path: str | os.PathLike, weights: bool = False) -> onnx.ModelProto:
    """The model at `path`. Weights in an external data file stay references into it unless `weights`
    (aim/weights.py): the passes change the graph's tail and never need them."""
    path = Path(path)
    if not path.is_file():
        raise InvalidGraphError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=weights)
    except Exception as error:  # protobuf raises DecodeError, onnx raises others for external data
        raise InvalidGraphError(
            f"{path} is not a readable ONNX model ({type(error).__name__}: {error}). "
            f"Re-export it, or check that the file was copied whole."
        ) from error
    if not model.graph.output:
        raise InvalidGraphError(f"{path} has no graph outputs: it is empty or not an ONNX model. Re-export it.")
    return model


def load_graph(path: str | os.PathLike) -> gs.Graph:
    return gs.import_onnx(load_onnx(path))


def save_onnx(
    model: onnx.ModelProto | gs.Graph,
    path: str | os.PathLike,
    check: bool = True,
    weights_dir: str | os.PathLike | None = None,
) -> Path:
    """Checks the model (onnx.checker) and writes it atomically. Weights that are references stay
    references when their file is beside `path` (`weights_dir`, where they resolve, defaults to
    path's folder), else they are copied into `<name>.data`; weights in memory go to `<name>.data`
    past 2 GiB (aim/weights.py)."""
    if isinstance(model, gs.Graph):
        model = gs.export_onnx(model)
    return save_model(model, path, weights_dir, check)
