"""Reading and writing ONNX files: clear errors for bad files, and no half-written artifact."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from aim.errors import InvalidGraphError
from aim.files import atomic_path

# Protobuf's hard limit; larger models keep their weights in an external data file.
_PROTOBUF_LIMIT = 2**31 - 1


def load_onnx(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise InvalidGraphError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
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


def save_onnx(model: onnx.ModelProto | gs.Graph, path: str | os.PathLike, check: bool = True) -> Path:
    """Checks the model (onnx.checker) and writes it atomically; weights go to `<name>.data` past 2 GiB."""
    if isinstance(model, gs.Graph):
        model = gs.export_onnx(model)
    path = Path(path)
    large = model.ByteSize() > _PROTOBUF_LIMIT
    if check and not large:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as error:
            raise InvalidGraphError(f"the graph for {path.name} is not valid ONNX: {error}") from error
    with atomic_path(path) as tmp:
        if large:
            onnx.save(model, str(tmp), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save(model, str(tmp))
    return path
