"""Models in, ONNX out: load a local checkpoint or build random weights, and trace with torch.onnx.

Nothing here knows a family or a task: callers pass the module to trace, its example inputs and the
names and dynamic axes of its inputs and outputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, ContextManager

from aim.errors import CheckpointError
from aim.files import remove
from aim.specs import TensorSpec
from aim.weights import save_model


def checkpoint_config(folder: str | os.PathLike) -> dict:
    """config.json of a `save_pretrained` folder, or a clear error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder. Pass a folder written by `model.save_pretrained(DIR)`.")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder: it has no config.json. Pass a folder written by `model.save_pretrained(DIR)`.")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error}): save the checkpoint again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds no JSON object: save the checkpoint again")
    return config


def load_checkpoint(model_class, folder: str | os.PathLike):
    """`model_class.from_pretrained(folder)` in FP32 (whatever the checkpoint stores: the export and the
    reference are FP32; FP16 engines are made from the FP32 graph) and eval mode, offline; load errors
    become CheckpointError."""
    import torch

    try:
        return model_class.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"could not load the checkpoint in {folder}: {error}") from error


def random_model(build: Callable[[], object], seed: int = 0):
    """A model with random weights from `build()`, seeded, in eval mode."""
    import torch

    torch.manual_seed(seed)
    return build().eval()


def export_onnx(
    module,
    inputs: dict,
    input_specs: tuple[TensorSpec, ...],
    output_specs: tuple[TensorSpec, ...],
    path: str | os.PathLike,
    opset: int = 17,
    context: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Path:
    """Traces `module` (positional inputs in the order of `input_specs`) to ONNX at `path`, every named
    dim left symbolic, written to a temporary name and renamed.

    The legacy TorchScript exporter is used: it is several times faster than dynamo for these models
    and gives the dynamic axes by name. Past protobuf's 2 GiB it writes every weight to a file of
    its own (hundreds for a 1B model), in a scratch folder here; they are gathered into one
    `<name>.data` beside the graph, file to file (aim/weights.py).
    """
    import onnx
    import torch

    path = Path(path)
    names = [spec.name for spec in input_specs]
    dynamic_axes = {spec.name: spec.dynamic_axes for spec in (*input_specs, *output_specs)}
    scratch = path.with_name(f".{path.name}.torch.tmp-{os.getpid()}")  # a leftover files.remove_leftovers knows
    remove(scratch)
    scratch.mkdir(parents=True)
    try:
        with torch.no_grad(), warnings.catch_warnings(), context():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(
                module.eval(),
                tuple(inputs[name] for name in names),
                str(scratch / path.name),
                input_names=names,
                output_names=[spec.name for spec in output_specs],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
        model = onnx.load(str(scratch / path.name), load_external_data=False)  # the graph: weights stay in scratch
        _static_output_dims(model, output_specs)
        save_model(model, path, weights_dir=scratch, check=False)
    finally:
        remove(scratch)
    return path


def _static_output_dims(model, output_specs: tuple[TensorSpec, ...]) -> None:
    """Writes back into `model` (a ModelProto) the static sizes the specs give (the number of classes)
    where the exporter's shape inference lost them (after a Resize to a computed size, UperNet's logits
    have no static class count)."""
    specs = {spec.name: spec for spec in output_specs}
    for output in model.graph.output:
        for dim, size in zip(output.type.tensor_type.shape.dim, specs[output.name].dims):
            if isinstance(size, int) and dim.dim_value != size:
                dim.dim_value = size  # (clears a symbolic dim_param: they are one field)
