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
from aim.files import atomic_path
from aim.specs import TensorSpec


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
    """`model_class.from_pretrained(folder)` in eval mode, offline; load errors become CheckpointError."""
    try:
        return model_class.from_pretrained(str(folder), local_files_only=True).eval()
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
    and gives the dynamic axes by name.
    """
    import torch

    path = Path(path)
    names = [spec.name for spec in input_specs]
    dynamic_axes = {spec.name: spec.dynamic_axes for spec in (*input_specs, *output_specs)}
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings(), context():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module.eval(),
            tuple(inputs[name] for name in names),
            str(tmp),
            input_names=names,
            output_names=[spec.name for spec in output_specs],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
        _static_output_dims(tmp, output_specs)
    return path


def _static_output_dims(path: Path, output_specs: tuple[TensorSpec, ...]) -> None:
    """Writes back the static sizes the specs give (the number of classes) where the exporter's shape
    inference lost them (after a Resize to a computed size, UperNet's logits have no static class count)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # the graph only: weights stay where they are
    specs = {spec.name: spec for spec in output_specs}
    changed = False
    for output in model.graph.output:
        for dim, size in zip(output.type.tensor_type.shape.dim, specs[output.name].dims):
            if isinstance(size, int) and dim.dim_value != size:
                dim.dim_value = size  # (clears a symbolic dim_param: they are one field)
                changed = True
    if changed:
        onnx.save(model, str(path))
