"""An export that never holds the weights: torch.onnx's dynamo exporter traces a model
made of FakeTensors (shapes and dtypes, no storage) in the build's dtype, and the graph is saved without
initializers; export/attach.py then writes the checkpoint's weights into one `<graph>.data`, tensor by
tensor. A 7B model exports in ~0.1 GB this way; TorchScript needs the model's weights, and several times
them (docs/real-sizes.md).

The graph keeps the FP32 interface of the FP32 export (`CastIO`: past in, logits and present out are
FP32), so the passes, the redistribution (FP32) and the verification see the same inputs and outputs;
inside, norms, softmax and rotary run in FP32 exactly where transformers runs them so in an FP16 model
(explicit Casts), and everything else in FP16. Exported in FP32 (an FP32 build of a checkpoint,
pipeline/model_source.py), the same graph computes in FP32 throughout. Its dynamic dims get the task's
names, and its nodes TorchScript's module paths (`name_by_module`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from aim.files import atomic_path, make_folder, remove_empty
from aim.specs import TensorSpec

OPSET = 18  # the dynamo exporter's lowest


class CastIO:
    """`make(inner, dtype)`: a module running `inner` (the task's wrapper) in `dtype` behind an FP32
    interface: its floating-point inputs past the first `tokens` are cast to `dtype`, its outputs to FP32."""

    @staticmethod
    def make(inner, dtype, tokens: int):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, *inputs):
                cast = [x.to(dtype) if x.is_floating_point() else x for x in inputs[tokens:]]
                return tuple(out.float() for out in self.inner(*inputs[:tokens], *cast))

        return Wrapped()


PREFIX = "inner.model."  # the initializers' names: the wrapper's attributes, then the model's state-dict keys


def fake_model(model_class, config, dtype):
    """`model_class` of `config` in `dtype`, made of FakeTensors (no storage), and the fake mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = model_class._from_config(config, dtype=dtype).eval()
    return model, mode


def export_fake(
    task,
    model,
    mode,
    inputs: dict,
    input_specs: tuple[TensorSpec, ...],
    output_specs: tuple[TensorSpec, ...],
    path: str | os.PathLike,
    dtype,
    context=contextlib.nullcontext,
) -> dict[str, tuple[tuple[int, ...], object]]:
    """Exports the fake `model` (task-wrapped, behind CastIO) to `path` without initializers; returns the
    initializers it needs: name -> (shape, torch dtype). Written to a temporary name and renamed."""
    import onnx
    import torch

    path = Path(path)
    names = [spec.name for spec in input_specs]
    tokens = sum(1 for spec in input_specs if spec.dtype.startswith("int"))
    shapes = tuple({axis: torch.export.Dim.AUTO for axis in spec.dynamic_axes} for spec in input_specs)
    made = make_folder(path.parent)
    try:
        with mode:
            wrapped = CastIO.make(task.wrap(model), dtype, tokens)
            with torch.no_grad(), warnings.catch_warnings(), context():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    wrapped,
                    tuple(inputs[name] for name in names),
                    None,
                    input_names=names,
                    output_names=[spec.name for spec in output_specs],
                    dynamic_shapes=(shapes,),
                    opset_version=OPSET,
                    dynamo=True,
                    optimize=False,
                    verbose=False,
                )
        wanted = {name: (tuple(value.shape), value.dtype) for name, value in program.model.graph.initializers.items()}
        with atomic_path(path) as tmp:
            program.save(str(tmp), include_initializers=False)
            graph = folded(tmp)
            name_dims(graph, input_specs, output_specs)
            name_by_module(graph)
            for node in graph.graph.node:  # the exporter's debugging notes (FX node, stack trace): ~2 KB a node
                del node.metadata_props[:]
            onnx.save(graph, str(tmp))
    except BaseException:
        remove_empty(made)
        raise
    return {name: (shape, _torch_dtype(dtype_)) for name, (shape, dtype_) in wanted.items()}


def _torch_dtype(dtype):
    """The torch dtype of an onnx_ir dtype."""
    import torch

    return {"FLOAT": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16, "INT64": torch.int64}.get(
        getattr(dtype, "name", str(dtype)), dtype
    )


def folded(path: str | os.PathLike):
    """The graph saved at `path` without its weights, its constant subgraphs folded by onnxscript's
    optimizer (what torch.onnx's `optimize=True` runs, which here would read the FakeTensor weights):
    TensorRT's parser takes a ReduceMean's axes or a Reshape's shape only as a constant, and the exporter
    computes them from Constants. The weights, absent from the file, are unknown inputs to it (onnx_ir
    warns of each: quieted), never read."""
    import logging

    import onnx_ir
    from onnxscript.optimizer import fold_constants, remove_unused_nodes

    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model = onnx_ir.load(str(path))
    finally:
        logger.setLevel(level)
    fold_constants(model)
    remove_unused_nodes(model)  # and the constants only folded nodes read (ONNX Runtime warns of each)
    return onnx_ir.to_proto(model)


SCOPES = "pkg.torch.onnx.name_scopes"  # a node's metadata: the paths of the modules it is in, outermost first


def name_by_module(model) -> None:
    """Each node of a module named under that module's path, as the TorchScript exporter names it and
    Task.keep_fp32 / Family.fp16_keep_fp32 select nodes: `/model/model/rotary_emb/node_cos` (the task
    wrapper's attributes, without CastIO's `inner`, dots as slashes), so that an FP16 graph converted
    from this export keeps the rotary embeddings in FP32 as it does TorchScript's. Nodes outside the
    model (shape bookkeeping) keep the exporter's names."""
    import ast

    for node in model.graph.node:
        scopes = next((entry.value for entry in node.metadata_props if entry.key == SCOPES), None)
        modules = ast.literal_eval(scopes)[:-1] if scopes else []  # the last scope: the FX node itself
        if modules and modules[-1].startswith("inner."):
            node.name = "/" + modules[-1].removeprefix("inner.").replace(".", "/") + "/" + node.name


def name_dims(model, input_specs: tuple[TensorSpec, ...], output_specs: tuple[TensorSpec, ...]) -> None:
    """The graph's inputs' and outputs' dims as the specs name them (the exporter names its symbols s0,
    s1, ... and writes sums for derived sizes); the intermediate shapes it inferred are dropped (ONNX
    Runtime and the passes infer their own)."""
    specs = {spec.name: spec for spec in (*input_specs, *output_specs)}
    for value in (*model.graph.input, *model.graph.output):
        for dim, size in zip(value.type.tensor_type.shape.dim, specs[value.name].dims):
            if isinstance(size, str):
                dim.dim_param = size
            elif isinstance(size, int):
                dim.dim_value = size
    del model.graph.value_info[:]
