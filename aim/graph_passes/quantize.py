"""Weight-only int4 / int8: every MatMul with a constant weight becomes ONNX Runtime's `MatMulNBits`,
quantized by ONNX Runtime's own per-node quantizer (the one `MatMulNBitsQuantizer` runs), one weight
in memory at a time.

    block 32, symmetric (no zero points), accuracy_level 4

accuracy_level 4 lets the CPU kernel quantize the activations to int8 per block and use the VNNI
integer dot products: measured on a 4096 x 14336 MatMul, int4 4.5 CPU ms per decode token with it
against 9.7 without, and int8 without it has no fast path at all (563 ms). What it computes is the
dequantized weight times the activations quantized per block of 32 along K, symmetric, scale max|a| /
127, rounded to nearest even (`int8_blocks`): measured against ONNX Runtime's MatMulNBits on a 4096 x
1024 weight, 5.7e-7 relative (FP32 activations), where the plain product is 5.3e-3 off, an error a random
32-layer model amplifies to 0.1 of its logits. Block 32 is ONNX Runtime
GenAI's CPU default and measured as accurate as block 128 on a trained model (docs/results.md).

Why not `MatMulNBitsQuantizer(model).process()`: it needs the whole model's weights in the proto and
keeps every quantized weight there until `onnx.save` serialises them again. Here each MatMul is handed
to the same `DefaultWeightOnlyQuantizer.quantize_matmul` with only its own weight in a scratch graph,
the packed weights and scales it makes are appended to the build's one weights file at once
(aim/weights.py), and the weights left as they are (embeddings, norms, convolutions) are copied there
file to file (or written there from the graph, for a model small enough to hold them inside), so the
bare, production and verification graphs made from the result share them. A weight read through
`Transpose(W)` (the dynamo exporter's `nn.Linear`) is quantized from W transposed. Nodes of the
redistribution (`aim_redistribution/*`) are never touched: it stays FP32, and at utility 0 the
modulated graph is the bare quantized graph bit for bit.

What MatMulNBits does not cover stays FP32 and is said so: Conv (all of a ResNet), Gemm (a classifier
on [B, C] features), MatMuls of two activations (attention scores).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aim.contract import PREFIX
from aim.weights import WeightsFile, read_blocks, transposed

BITS = {"int4": 4, "int8": 8}  # the precisions this pass makes, and their weights' bits
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits (VNNI); see the module's docstring
MS_DOMAIN = "com.microsoft"
IN_GRAPH_BYTES = 1024  # weights at least this large go to the weights file; shapes and scalars stay in the graph


@dataclass(frozen=True)
class Quantizable:
    """A MatMul whose weight is constant: the node, the initializer holding the weight, and whether the
    graph reads it through a Transpose (then the weight [K, N] is that initializer transposed)."""

    node: onnx.NodeProto
    initializer: TensorProto
    transposed: bool


@dataclass
class Coverage:
    """What a quantization changed: MatMuls quantized, and the weight bytes (as stored before) that were
    quantized against those left FP32, by the op that reads them."""

    bits: int
    block_size: int = BLOCK_SIZE
    accuracy_level: int = ACCURACY_LEVEL
    matmuls: int = 0
    quantized_bytes: int = 0
    kept_bytes: dict[str, int] = field(default_factory=dict)  # op type (or "other") -> bytes left as they were
    # the weight initializer of the graph quantized -> the name of its packed weight in the quantized graph
    # (the first MatMulNBits made from it): how a reference finds what the engine holds (pipeline/quantized.py)
    packed: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + sum(self.kept_bytes.values())

    def as_dict(self) -> dict:
        return {
            "bits": self.bits,
            "block_size": self.block_size,
            "symmetric": True,
            "accuracy_level": self.accuracy_level,
            "matmuls": self.matmuls,
            "quantized_bytes": self.quantized_bytes,
            "kept_bytes": dict(self.kept_bytes),
        }

    def summary(self) -> str:
        """One line for the log: how much of the model the engine holds in int4 / int8, and what not."""
        share = self.quantized_bytes / self.total_bytes if self.total_bytes else 0.0
        kept = ", ".join(f"{op} {size / 1e6:.2f} MB" for op, size in sorted(self.kept_bytes.items()) if size)
        return (
            f"int{self.bits}: {self.matmuls} MatMuls, {self.quantized_bytes / 1e6:.2f} of "
            f"{self.total_bytes / 1e6:.2f} MB of weights ({share:.1%}) quantized (block {self.block_size}, symmetric, "
            f"accuracy_level {self.accuracy_level})" + (f"; kept FP32: {kept}" if kept else "")
        )

    def warning(self) -> str | None:
        """What a user must know when quantization cannot give a smaller, faster engine."""
        if self.matmuls == 0:
            return (
                f"warning: int{self.bits} quantized nothing: MatMulNBits covers MatMuls with a constant weight, and "
                "this model has none (its weights are read by "
                + (", ".join(sorted(op for op, size in self.kept_bytes.items() if size)) or "no op")
                + "). The engine is the FP32 graph, verified as FP32: no smaller or faster than PRECISION=fp32."
            )
        if self.quantized_bytes < 0.5 * self.total_bytes:
            return (
                f"warning: int{self.bits} quantized only {self.quantized_bytes / self.total_bytes:.0%} of the weight "
                "bytes; the rest (see above) stays FP32."
            )
        return None


def quantizable(model: onnx.ModelProto) -> list[Quantizable]:
    """The MatMuls of `model`'s main graph that MatMulNBits can take: weight a 2-D initializer, or a
    2-D initializer read through Transpose(perm [1, 0]); never a node of the redistribution."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    producer = {output: node for node in model.graph.node for output in node.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.name.startswith(PREFIX):
            continue
        weight = node.input[1]
        if weight in initializers and len(initializers[weight].dims) == 2:
            found.append(Quantizable(node, initializers[weight], False))
            continue
        transpose = producer.get(weight)
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        source = initializers[transpose.input[0]]
        if len(source.dims) == 2 and perm in (None, [1, 0]):
            found.append(Quantizable(node, source, True))
    return found


def weight(item: Quantizable, weights_dir: str | os.PathLike) -> np.ndarray:
    """The MatMul's weight [K, N] as the graph multiplies by it (read from the model or its data file)."""
    values = _values(item.initializer, Path(weights_dir))
    return transposed(values) if item.transposed else values


def digest(weight_kn: np.ndarray) -> str:
    """A weight's identity by value (its [K, N] float32 bytes): how a PyTorch reference finds which of its
    `nn.Linear` weights (W.T) the engine holds quantized (pipeline/quantized.py)."""
    return hashlib.sha1(np.ascontiguousarray(weight_kn, np.float32).tobytes()).hexdigest()


def dequantize(weight_kn: np.ndarray, bits: int, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """What MatMulNBits multiplies by, as float32 [K, N]: ONNX Runtime's quantizer (the same C++ routine
    the pass runs) applied to `weight_kn`, then scale x (q - zero point) per block of K."""
    packed, scales = quantize_blocks(weight_kn, bits, block_size)
    return np.ascontiguousarray(unpack(packed, scales, bits, weight_kn.shape[0]).T)


def quantize_blocks(weight_kn: np.ndarray, bits: int, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's symmetric block quantization of `weight_kn` [K, N], as MatMulNBits holds it: the
    levels packed [N, blocks, block_size x bits / 8] (uint8) and the scales [N, blocks]."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    # FP16 weights are quantized as FP16 (FP16 scales), as the pass quantizes them; anything else as FP32
    values = np.ascontiguousarray(weight_kn, np.float16 if weight_kn.dtype == np.float16 else np.float32)
    rows, cols = values.shape  # K, N
    blocks = -(-rows // block_size)
    padded = np.pad(values, ((0, blocks * block_size - rows), (0, 0))) if blocks * block_size != rows else values
    packed = np.zeros((cols, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((cols, blocks), values.dtype)
    zero_points = np.zeros((cols, -(-blocks * bits // 8)), np.uint8)  # unused when symmetric
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, np.ascontiguousarray(padded), scales, zero_points, block_size, cols, rows, True)
    return packed, scales


def unpack(packed: np.ndarray, scales: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """float32 [N, K] (an nn.Linear's layout) of MatMulNBits' packed levels [N, blocks, bytes] and scales
    (N x blocks values): scale x (q - zero point), the padding of the last block cut to K = `rows`."""
    cols, blocks = packed.shape[0], packed.shape[1]
    if bits == 4:  # two values per byte, the low nibble first; symmetric: zero point 8
        levels = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(cols, blocks, -1).astype(np.float32) - 8
    else:  # symmetric: zero point 128
        levels = packed.reshape(cols, blocks, -1).astype(np.float32) - 128
    levels *= np.asarray(scales, np.float32).reshape(cols, blocks)[:, :, None]
    return levels.reshape(cols, -1)[:, :rows]


def int8_blocks(activations: np.ndarray, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """What MatMulNBits at accuracy_level 4 multiplies by for `activations` [..., K] (float32): each block
    of `block_size` along K quantized to int8, symmetric (scale max|a| / 127, rounded to nearest even),
    and dequantized."""
    values = np.asarray(activations, np.float32)
    k = values.shape[-1]
    padded = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, -k % block_size)])
    blocks = padded.reshape(*values.shape[:-1], -1, block_size)
    largest = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.divide(np.float32(127), largest, out=np.zeros_like(largest), where=largest != 0)
    return (np.rint(blocks * inverse) * (largest / np.float32(127))).reshape(padded.shape)[..., :k]


@dataclass(frozen=True)
class Held:
    """What a MatMulNBits node multiplies by, as the graph stores it: its packed levels and scales
    (initializers), K x N, bits and block size."""

    packed: TensorProto
    scales: TensorProto
    rows: int  # K
    cols: int  # N
    bits: int
    block_size: int
    accuracy_level: int = 0  # 4: the kernel quantizes the activations to int8 per block (int8_blocks)

    def arrays(self, weights_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
        """(packed [N, blocks, bytes] uint8, scales [N, blocks]) read from the graph or its weights file:
        one weight's, a fraction of its float size."""
        packed = _values(self.packed, Path(weights_dir)).reshape(self.cols, -(-self.rows // self.block_size), -1)
        return packed, _values(self.scales, Path(weights_dir)).reshape(self.cols, -1)


def held_weights(model: onnx.ModelProto) -> dict[str, Held]:
    """Every MatMulNBits of `model`'s main graph by the name of its packed weight: what it holds."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        found[node.input[1]] = Held(
            initializers[node.input[1]],
            initializers[node.input[2]],
            int(attributes["K"]),
            int(attributes["N"]),
            int(attributes["bits"]),
            int(attributes["block_size"]),
            int(attributes.get("accuracy_level", 0)),
        )
    return found


def dequantized_model(model: onnx.ModelProto, weights_dir: str | os.PathLike, bits: int) -> onnx.ModelProto:
    """A copy of `model` whose quantizable weights hold what the quantized engine multiplies by, FP32
    (the reference a user's ONNX is verified against; other weights stay references)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    replaced = {}
    for item in quantizable(copy):
        if item.initializer.name in replaced:
            continue
        values = dequantize(weight(item, weights_dir), bits)
        replaced[item.initializer.name] = values.T if item.transposed else values
    for tensor in copy.graph.initializer:
        if tensor.name in replaced:
            tensor.CopyFrom(numpy_helper.from_array(replaced[tensor.name].astype(np.float32), tensor.name))
    return copy


def quantize_model(
    model: onnx.ModelProto,
    weights_dir: str | os.PathLike,
    weights: WeightsFile,
    bits: int,
    values_of: Callable[[str], np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, Coverage]:
    """`model` (read without its weights, which are in `weights_dir`) with every quantizable MatMul a
    MatMulNBits, and every weight it still reads in `weights` (the quantized ones written there once
    made, the others copied file to file); and what was quantized. `values_of`: the values of `model`'s
    initializers by name, where they are declared only (an export whose weights are still in the
    checkpoint: each read once, when quantized or written)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    weights_dir = Path(weights_dir)
    quantizer = DefaultWeightOnlyQuantizer(
        DefaultWeightOnlyQuantConfig(
            block_size=BLOCK_SIZE,
            is_symmetric=True,
            accuracy_level=ACCURACY_LEVEL,
            bits=bits,
            op_types_to_quantize=("MatMul",),
        )
    )
    graph = model.graph
    targets = {item.node.output[0]: item for item in quantizable(model)}  # an output names its node
    coverage = Coverage(bits)
    nodes, made, done = [], [], {}
    for node in graph.node:
        item = targets.get(node.output[0])
        if item is None:
            nodes.append(node)
            continue
        scratch = onnx.GraphProto()  # the quantizer reads the weight from here and adds its outputs here
        if values_of is not None and _declared_only(item.initializer):
            values = values_of(item.initializer.name)
            values = transposed(values) if item.transposed else values
        else:
            values = weight(item, weights_dir)
        held = scratch.initializer.add(name=node.input[1], dims=values.shape)  # filled in place: no proto copy
        held.data_type = helper.np_dtype_to_tensor_dtype(values.dtype)
        held.raw_data = values.tobytes()
        del values
        new_nodes = quantizer.quantize_matmul(node, [scratch])
        for tensor in scratch.initializer[1:]:
            values = numpy_helper.to_array(tensor)
            reference = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            made.append(weights.add(reference, lambda values=values: [values], key=("quantized", tensor.name)))
        nodes.extend(new_nodes)
        coverage.matmuls += 1
        made_node = next(made_node for made_node in new_nodes if made_node.op_type == "MatMulNBits")
        coverage.packed.setdefault(item.initializer.name, made_node.input[1])
        if item.initializer.name not in done:
            done[item.initializer.name] = True
            coverage.quantized_bytes += _bytes(item.initializer)
    nodes = _without_unread_transposes(nodes, {output.name for output in graph.output})
    read = {name for node in nodes for name in node.input}
    readers = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, node.op_type)
    kept = []
    for tensor in graph.initializer:
        if tensor.name not in read:
            continue
        if values_of is not None and _declared_only(tensor):  # its values from the checkpoint; small ones inline
            values = values_of(tensor.name)
            if values.nbytes >= IN_GRAPH_BYTES:
                reference = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
                tensor = weights.add(reference, lambda values=values: [values], key=("kept", tensor.name))
            else:
                tensor = numpy_helper.from_array(values, tensor.name)
            del values
        elif onnx.external_data_helper.uses_external_data(tensor):
            weights.copy_tensor(tensor, weights_dir)
        elif _bytes(tensor) >= IN_GRAPH_BYTES:  # the graphs made from this one share it, not copy it
            values = numpy_helper.to_array(tensor)
            reference = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            tensor = weights.add(reference, lambda values=values: [values], key=("kept", tensor.name))
        kept.append(tensor)
        if tensor.name not in done and len(tensor.dims) >= 2:  # weights, not the shapes and scalars
            op = readers.get(tensor.name, "other")
            coverage.kept_bytes[op] = coverage.kept_bytes.get(op, 0) + _bytes(tensor)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + made)
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model, coverage


def _without_unread_transposes(nodes: list, outputs: set[str]) -> list:
    """Drops Transposes of weights that no node reads any more (their MatMul is now a MatMulNBits)."""
    while True:
        read = {name for node in nodes for name in node.input} | outputs
        unread = [node for node in nodes if node.op_type == "Transpose" and node.output[0] not in read]
        if not unread:
            return nodes
        nodes = [node for node in nodes if all(node is not other for other in unread)]


def _declared_only(tensor: TensorProto) -> bool:
    """Whether `tensor` names a weight without holding or referring to its values (values_of has them)."""
    typed = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
    return int(np.prod(tensor.dims, dtype=np.int64)) > 0 and not (
        tensor.raw_data
        or onnx.external_data_helper.uses_external_data(tensor)
        or any(len(getattr(tensor, field)) for field in typed)
    )


def _bytes(tensor: TensorProto) -> int:
    return (
        int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    )


def _values(tensor: TensorProto, weights_dir: Path) -> np.ndarray:
    if not onnx.external_data_helper.uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    (values,) = read_blocks(tensor, weights_dir, _bytes(tensor) or 1)  # the whole tensor in one read
    return values.reshape(tuple(tensor.dims))


def iter_weights(model: onnx.ModelProto, weights_dir) -> Iterator[tuple[Quantizable, np.ndarray]]:
    """Every quantizable MatMul with its weight [K, N], one weight in memory at a time."""
    for item in quantizable(model):
        yield item, weight(item, weights_dir)
