"""ONNX weights outside the graph: one external data file per model, shared by the graphs of a build.

A model past protobuf's 2 GiB keeps its weights in an external data file, each initializer a
reference (location, offset, length) into it. Graphs here are read with their references only
(`onnx.load(..., load_external_data=False)`), so the passes, which change the graph's tail, never
read the weights; and a graph saved beside the data file keeps the references, so the bare,
production and verification graphs of a build share one copy of the weights (ONNX Runtime and
TensorRT's parser resolve `location` relative to the model file). Only what makes new weights
writes bytes: gathering torch.onnx's one-file-per-tensor output into one file, and FP16 copies.

Why not onnx's own helpers (load_external_data_for_tensor, save_external_data): they move the bytes
through the tensor's raw_data field, and the model's protobuf arena keeps them until the whole model
is freed (measured: 4.6 GB resident to gather 4.4 GB of weights one tensor at a time). Here bytes go
file to file, and a tensor is read in blocks with numpy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from aim.errors import InvalidGraphError
from aim.files import atomic_path

# Every tensor starts on a page boundary, so a runtime that maps external data can map it (ONNX Runtime
# 1.32 maps it, and keeps it mapped where it does not prepack the weight into a copy of its own).
ALIGN = 4096
_CHUNK = 1 << 24  # bytes per read: copying between files, reading a tensor in blocks
_PROTOBUF_LIMIT = 2**31 - 1  # a model whose bytes are in memory past this keeps its weights in <name>.data
EXTERNAL_MIN_BYTES = 1024  # smaller initializers (shapes, axes, scalars) stay in the graph (onnx's default)


def transposed(values: np.ndarray, tile: int = 32) -> np.ndarray:
    """values.T of a matrix, contiguous, copied tile by tile (2.4x faster than numpy's one strided copy on a
    14336 x 4096 FP16 weight: the tiles stay in cache). A Linear's weight as MatMul multiplies by it."""
    out = np.empty(values.shape[::-1], values.dtype)
    for row in range(0, values.shape[0], tile):
        for col in range(0, values.shape[1], tile):
            out[col : col + tile, row : row + tile] = values[row : row + tile, col : col + tile].T
    return out


def external_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    """The tensors of `model` (initializers and Constant values, in subgraphs too) whose bytes are in a file."""
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def data_files(model: onnx.ModelProto) -> list[str]:
    """The external data files `model` refers to, as it names them (relative to the model file)."""
    return sorted({where(tensor)[0] for tensor in external_tensors(model)})


def where(tensor: TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length) of an external tensor's bytes; length None: to the end of the file."""
    info = external_data_helper.ExternalDataInfo(tensor)
    location = info.location
    if not location or Path(location).is_absolute() or ".." in Path(location).parts:
        raise InvalidGraphError(
            f"tensor {tensor.name!r} keeps its data at {location!r}: only a file beside the model is accepted"
        )
    return location, info.offset or 0, info.length


def _refer(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    """Makes `tensor` a reference to `length` bytes at `offset` of `location` (onnx's set_external_data
    insists on the bytes being in the tensor)."""
    for values in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(values)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def read_blocks(tensor: TensorProto, weights_dir: str | os.PathLike, block_bytes: int = _CHUNK) -> Iterator[np.ndarray]:
    """An external tensor's values in order, flat, `block_bytes` at a time: however large the tensor,
    memory holds one block."""
    location, offset, _ = where(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    left = int(np.prod(tensor.dims, dtype=np.int64))
    per_block = max(1, block_bytes // dtype.itemsize)
    path = Path(weights_dir) / location
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            while left:
                values = np.fromfile(handle, dtype=dtype, count=min(per_block, left))
                if values.size == 0:
                    raise InvalidGraphError(
                        f"{path} is shorter than the model says (tensor {tensor.name!r}): copy it whole"
                    )
                left -= values.size
                yield values
    except OSError as error:
        raise InvalidGraphError(f"the weights of {tensor.name!r} are not readable in {path}: {error}") from error


class WeightsFile:
    """An external data file being written: each tensor's bytes appended page-aligned, and the tensor
    turned into a reference to them. The file is created on the first tensor; `location` is the name
    references give (the file may be written under a temporary name and renamed to it)."""

    def __init__(self, path: str | os.PathLike, location: str | None = None):
        self.path = Path(path)
        self.location = location or self.path.name
        self._handle = None
        self._copied: dict[tuple, tuple[int, int]] = {}  # (source, offset, length) -> (offset, length) here

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _start(self) -> int:
        if self._handle is None:
            self._handle = open(self.path, "wb")
        end = self._handle.seek(0, os.SEEK_END)
        start = -(-end // ALIGN) * ALIGN
        self._handle.write(b"\0" * (start - end))
        return start

    def add(self, tensor: TensorProto, blocks: Callable[[], Iterable[np.ndarray]], key: tuple) -> TensorProto:
        """Makes `tensor` (its dtype and dims set) refer to the bytes of `blocks()` written in order, here
        the first time `key` is seen; later tensors with the same key share them (`blocks` is not called)."""
        if key not in self._copied:
            start = self._start()
            for block in blocks():
                self._handle.write(memoryview(np.ascontiguousarray(block).reshape(-1)).cast("B"))  # no copy to bytes
            self._handle.flush()  # a graph referring to it may be checked before the file is closed
            self._copied[key] = (start, self._handle.tell() - start)
        _refer(tensor, self.location, *self._copied[key])
        return tensor

    def copy_tensor(self, tensor: TensorProto, weights_dir: Path) -> None:
        """Copies an external tensor's bytes (read from `weights_dir`) here, file to file, and re-points it."""
        location, offset, length = where(tensor)
        source = weights_dir / location
        if length is None:
            length = source.stat().st_size - offset
        key = (str(source), offset, length)
        if key not in self._copied:
            start = self._start()
            with open(source, "rb") as reader:
                reader.seek(offset)
                left = length
                while left:
                    block = reader.read(min(_CHUNK, left))
                    if not block:
                        raise InvalidGraphError(
                            f"{source} is shorter than the model says (tensor {tensor.name!r}): copy it whole"
                        )
                    self._handle.write(block)
                    left -= len(block)
            self._handle.flush()
            self._copied[key] = (start, length)
        _refer(tensor, self.location, *self._copied[key])


def _in_memory(model: onnx.ModelProto, threshold: int) -> list[TensorProto]:
    """The initializers of `model` (subgraphs' too) that hold at least `threshold` bytes in the model."""
    return [
        tensor
        for tensor in external_data_helper._get_initializer_tensors(model)
        if not external_data_helper.uses_external_data(tensor) and tensor.ByteSize() >= threshold
    ]


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    weights_dir: str | os.PathLike | None = None,
    check: bool = True,
    external: bool = False,
) -> Path:
    """Writes `model` at `path` atomically, its weights in one external data file at most.

    A model read with its references only keeps them when its data file is beside `path`
    (`weights_dir`, where the references resolve, is path's folder); otherwise their bytes are
    copied into <path>.data. A model holding its bytes past protobuf's limit writes them to
    <path>.data; so does one of any size with `external` (every initializer of 1 KB or more, page-
    aligned: the graphs saved beside it then share them, and a graph pass never reads them). Then
    onnx's checker runs on the file as written (in memory it would look for the data files relative
    to the working directory)."""
    path = Path(path)
    here = path.parent
    weights_dir = Path(weights_dir) if weights_dir is not None else here
    external_ = external_tensors(model)
    inline = _in_memory(model, EXTERNAL_MIN_BYTES) if external else []
    if inline or (external_ and weights_dir.resolve() != here.resolve()):
        data = here / (path.name + ".data")
        with atomic_path(data) as tmp_data, WeightsFile(tmp_data, data.name) as out:
            for tensor in external_:
                out.copy_tensor(tensor, weights_dir)
            for tensor in inline:  # moved one at a time: written, then its bytes dropped from the model
                out.add(tensor, lambda t=tensor: [numpy_helper.to_array(t)], key=("inline", id(tensor)))
        try:  # the references name the data file: it is in place before the graph is written and checked
            with atomic_path(path) as tmp:
                onnx.save(model, str(tmp))
                _check(tmp, path, check)
        except BaseException:
            data.unlink(missing_ok=True)
            raise
        return path
    with atomic_path(path) as tmp:
        if not external_ and model.ByteSize() > _PROTOBUF_LIMIT:
            onnx.save(model, str(tmp), save_as_external_data=True, location=path.name + ".data")
            _check(tmp, path, check)
        else:
            missing = [name for name in data_files(model) if not (here / name).is_file()]
            if missing:
                raise InvalidGraphError(f"{path.name} would refer to weights {missing} that are not in {here}")
            onnx.save(model, str(tmp))
            _check(tmp, path, check)
    return path


def _check(written: Path, path: Path, check: bool) -> None:
    if not check:
        return
    try:
        onnx.checker.check_model(str(written))
    except onnx.checker.ValidationError as error:
        raise InvalidGraphError(f"the graph for {path.name} is not valid ONNX: {error}") from error
