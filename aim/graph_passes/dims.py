"""A user's ONNX brought to the build folder's conventions, without touching what it computes.

The families' exports name the batch dim `batch`, name every dynamic dim, and return the logits
first; Triton batches on a dim-0 named `batch`, runners read the first output as the logits, and a
TensorRT profile and the manifest key ranges by dim name. A user's graph may say `n`, leave a dim
unnamed, or return its logits second. `conventional_io` renames and reorders the graph's inputs and
outputs only (symbolic names and output order); the nodes and weights stay as they are.
"""

from __future__ import annotations

import onnx

from aim.contract import BATCH
from aim.errors import InvalidGraphError


def _dims(value: onnx.ValueInfoProto):
    return value.type.tensor_type.shape.dim if value.type.tensor_type.HasField("shape") else []


def _is_dynamic(dim) -> bool:
    return not dim.HasField("dim_value") or dim.dim_value <= 0


def conventional_io(model: onnx.ModelProto, logits: str) -> onnx.ModelProto:
    """A copy of `model` whose inputs and outputs have dim 0 named `batch`, every other unnamed
    dynamic input dim named `<input>_axis<k>`, and the output `logits` first. Refuses a graph whose
    batch (dim 0 of every input and of the logits) is not dynamic: modulation is per sample."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    outputs = {value.name: value for value in graph.output}
    if logits not in outputs:
        raise InvalidGraphError(
            f"the graph has no output named {logits!r}; its outputs are {sorted(outputs)}. Pass the name of "
            "the logits output (--logits NAME)."
        )
    batched = [*inputs, outputs[logits]]
    for value in batched:
        dims = _dims(value)
        if not dims or not _is_dynamic(dims[0]):
            shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise InvalidGraphError(
                f"{value.name!r} has dims {shown}: its axis 0 must be a dynamic batch, since each sample gets its own "
                f"utility and Triton batches on axis 0. Export with a dynamic batch axis (torch.onnx: dynamic_axes="
                f"{{{value.name!r}: {{0: 'batch'}}}})."
            )
    # The names dim 0 goes by in the user's graph become `batch` wherever they appear in its IO.
    old = {dims[0].dim_param for dims in map(_dims, batched) if dims[0].dim_param} - {BATCH}
    taken = [
        v.name for v in (*inputs, *graph.output) for axis, d in enumerate(_dims(v)) if axis and d.dim_param == BATCH
    ]
    if taken:
        raise InvalidGraphError(
            f"{taken} name a dim other than axis 0 {BATCH!r}; rename it: {BATCH!r} is the batch here"
        )
    input_names = {value.name for value in inputs}
    for value in (*inputs, *graph.output, *graph.value_info):
        is_io = value.name in input_names or value.name in outputs
        for axis, dim in enumerate(_dims(value)):
            if dim.dim_param in old or (
                is_io and axis == 0 and value.name in (*input_names, logits) and not dim.dim_param
            ):
                dim.dim_param = BATCH
            elif is_io and value.name in input_names and _is_dynamic(dim) and not dim.dim_param:
                dim.dim_param = f"{value.name}_axis{axis}"
    ordered = [outputs[logits], *(value for value in graph.output if value.name != logits)]
    copies = [onnx.ValueInfoProto.FromString(value.SerializeToString()) for value in ordered]
    del graph.output[:]
    graph.output.extend(copies)
    return model
