"""The weights of a graph exported without them (export/fake_export.py), attached from the checkpoint's
safetensors: each tensor read alone (transformers' safetensors are mapped, so a read touches its pages
only), converted to the dtype the graph wants (FP16 for a reduced build; FP32 for an FP32 build, a bf16
or fp16 tensor widened alone), transposed where the graph reads it only through a Transpose (a Linear's
weight, stored as TorchScript stores it), and appended page-aligned to one `<graph>.data`
(aim/weights.py). Memory holds one tensor and its converted copy at a time (the largest: the embedding).

A name the checkpoint lacks is a tied weight (the head that is the embedding: one initializer, one copy)
or a buffer the model computes rather than stores (rotary frequencies), taken from a one-layer model of
the same config with a tiny vocabulary, made for that (cheap). FP16 cannot hold magnitudes past 65504:
such values are clipped, counted and reported (bf16 can hold them).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

from aim.errors import CheckpointError
from aim.files import atomic_path
from aim.weights import WeightsFile, transposed

FP16_MAX = 65504.0


@dataclass
class Attached:
    tensors: int
    bytes: int
    clipped: int  # values past FP16's range, clipped to it
    computed: list[str]  # buffers taken from a model of the config (not stored in the checkpoint)


def _shards(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> its safetensors file."""
    from safetensors import safe_open

    keys = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            keys.update(dict.fromkeys(handle.keys(), shard))
    return keys


def _computed_buffers(model_class, config) -> dict:
    """The buffers of a one-layer, 8-token model of `config` (real tensors; built on first need)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers, small.vocab_size = 1, 8
    return {name: buffer for name, buffer in model_class._from_config(small).named_buffers()}


def _aliases(model) -> dict[str, list[str]]:
    """Each parameter's names in `model` (several for a tied weight: the head that is the embedding)."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return {name: names for names in groups.values() for name in names}


def _read_transposed(graph) -> dict:
    """Initializer name -> the Transpose (perm [1, 0]) that is its only reader: the dynamo exporter's
    `nn.Linear` (MatMul(x, Transpose(W))). Such a weight is stored transposed and the Transpose dropped,
    as TorchScript's export stores it: otherwise ONNX Runtime folds the Transpose into an in-memory copy
    of the weight in every session (+0.1 to 0.2 GB on a 135M model). A tied weight (also an embedding's
    Gather) keeps its one copy and its Transpose."""
    import onnx

    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    in_subgraphs = {  # names a branch reads from the outer graph: left as they are
        name
        for node in graph.node
        for attribute in node.attribute
        if attribute.type == onnx.AttributeProto.GRAPH
        for inner in attribute.g.node
        for name in inner.input
    }
    outputs = {value.name for value in graph.output}
    found = {}
    for name, nodes in readers.items():
        node = nodes[0]
        if len(nodes) != 1 or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm == [1, 0] and node.output[0] not in in_subgraphs | outputs:
            found[name] = node
    return found


def _drop_transposes(graph, transposed: dict) -> None:
    """Each dropped Transpose's readers read its (now transposed) initializer instead."""
    renamed = {node.output[0]: name for name, node in transposed.items()}
    dropped = {id(node) for node in transposed.values()}
    kept = [node for node in graph.node if id(node) not in dropped]
    for node in kept:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)


class CheckpointTensors:
    """The initializers of `wanted` (name -> (shape, torch dtype)) read from `checkpoint` one at a time,
    converted to the dtype the graph wants: `tensors(name)` -> a numpy array. `model`: the (fake) model the
    graph was exported from, whose names they are after `prefix`. What was read is counted in `found`."""

    def __init__(self, wanted: dict, checkpoint: str | os.PathLike, model, prefix: str):
        self.wanted, self.checkpoint, self.model, self.prefix = wanted, Path(checkpoint), model, prefix
        self.shards, self.buffers, self.aliases = _shards(self.checkpoint), None, _aliases(model)
        self.found = Attached(0, 0, 0, [])

    def __call__(self, name: str):
        import torch
        from safetensors import safe_open

        shape, dtype = self.wanted[name]
        key = self.key(name)
        if key in self.shards:
            with safe_open(str(self.shards[key]), framework="pt") as handle:
                value = handle.get_tensor(key)
        else:
            if self.buffers is None:
                self.buffers = _computed_buffers(type(self.model), self.model.config)
            layer0 = re.sub(r"\.layers\.\d+\.", ".layers.0.", key)
            if layer0 not in self.buffers:
                raise CheckpointError(
                    f"{self.checkpoint} lacks the weight {key!r} the model needs: save the checkpoint again with "
                    "`model.save_pretrained(DIR)`"
                )
            value = self.buffers[layer0]
            if key not in self.found.computed:
                self.found.computed.append(key)
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.checkpoint}: {key!r} has shape {tuple(value.shape)}, the model of its config.json "
                f"{tuple(shape)}: save the checkpoint again with `model.save_pretrained(DIR)`"
            )
        if dtype == torch.float16 and value.is_floating_point():
            over = int((value.abs() > FP16_MAX).sum())
            self.found.clipped += over
            value = value.clamp(-FP16_MAX, FP16_MAX) if over else value
        array = value.to(dtype).numpy()
        self.found.tensors += 1
        self.found.bytes += array.nbytes
        return array

    def key(self, name: str) -> str:
        """The checkpoint's key of initializer `name` (a tied weight's: the stored alias, one for all)."""
        key = name.removeprefix(self.prefix)
        return next((alias for alias in self.aliases.get(key, []) if alias in self.shards), key)

    def stub(self, name: str):
        """The initializer `name` as the graph declares it (name, type, shape), without its values."""
        import onnx
        import torch

        shape, dtype = self.wanted[name]
        element = onnx.helper.np_dtype_to_tensor_dtype(torch.empty((), dtype=dtype).numpy().dtype)
        return onnx.TensorProto(name=name, data_type=element, dims=shape)


def attach(graph: str | os.PathLike, tensors: CheckpointTensors) -> Attached:
    """Writes every initializer `tensors` reads into <graph>.data and makes `graph` refer to them; a Linear
    weight read by a Transpose alone is stored transposed and the Transpose dropped (_read_transposed).
    Both files are written atomically."""
    import onnx

    graph = Path(graph)
    proto = onnx.load(str(graph), load_external_data=False)
    through_transpose = {name: node for name, node in _read_transposed(proto.graph).items() if name in tensors.wanted}
    data = graph.with_name(graph.name + ".data")
    with atomic_path(data) as tmp, WeightsFile(tmp, data.name) as out:
        for name in tensors.wanted:
            array = tensors(name)
            if name in through_transpose:
                array = transposed(array)
            tensor = onnx.TensorProto(
                name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape
            )
            out.add(
                tensor, lambda array=array: [array], key=("checkpoint", tensors.key(name), name in through_transpose)
            )
            proto.graph.initializer.append(tensor)
            del array
        out.close()
        _drop_transposes(proto.graph, through_transpose)
        with atomic_path(graph) as written:
            onnx.save(proto, str(written))
    return tensors.found
