"""Models in, ONNX out: load a local checkpoint or build random weights, and trace with torch.onnx.

Nothing here knows a family or a task: callers pass the module to trace, its example inputs and the
names and dynamic axes of its inputs and outputs.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path

from aim.errors import CheckpointError
from aim.files import make_folder, read_json, remove, remove_empty
from aim.specs import TensorSpec
from aim.weights import save_model


def checkpoint_config(folder: str | os.PathLike) -> dict:
    """config.json of a `save_pretrained` folder, or a clear error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder. Pass a folder written by `model.save_pretrained(DIR)`.")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a checkpoint folder: it has no config.json. Pass a folder written by "
            "`model.save_pretrained(DIR)`."
        )
    config = read_json(path, CheckpointError, "save the checkpoint again")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds no JSON object: save the checkpoint again")
    return config


def load_checkpoint(model_class, folder: str | os.PathLike, dtype: str = "float32"):
    """`model_class.from_pretrained(folder)` in `dtype` (FP32 whatever the checkpoint stores, for an FP32
    build and FP16 engines made from the FP32 graph; the stored dtype for a reduced-precision build,
    whose weights are then the safetensors' mapped pages, not a copy) and eval mode, offline, its weights
    required to cover the model exactly (check_coverage); load errors become CheckpointError."""
    import pickle

    import torch
    from safetensors import SafetensorError
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # its warnings about missing or unused weights: check_coverage says it in one error
    try:
        model, info = model_class.from_pretrained(
            str(folder),
            local_files_only=True,
            dtype=getattr(torch, dtype),
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"could not load the checkpoint in {folder}: {str(error).strip()[:1000]}") from error
    finally:
        logging.set_verbosity(verbosity)
    check_coverage(model, info, folder)
    return model.eval()


def check_coverage(model, info: dict, folder: str | os.PathLike) -> None:
    """Refuses a checkpoint whose weights do not cover the model: tensors the model has and the
    checkpoint lacks (transformers would fill them with unseeded random values, and the build would
    then verify the engine against that same broken model), tensors the model does not have, and
    tensors of another shape. `info`: from_pretrained's loading info, which names them."""
    problems = []
    for key, what in (
        ("missing_keys", "missing from the checkpoint"),
        ("unexpected_keys", "in the checkpoint but not in the model"),
    ):
        names = sorted(info.get(key) or [])
        if names:
            problems.append(f"{len(names)} tensor(s) {what}: {_names(names)}")
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
        shown = [f"{name} (the model's is {shapes[name]})" if name in shapes else str(name) for name in mismatched]
        problems.append(f"{len(mismatched)} tensor(s) of another shape than the model's: {_names(shown)}")
    if problems:
        raise CheckpointError(
            f"the weights in {folder} do not cover the model its config.json describes: "
            + "; ".join(problems)
            + ". Save the checkpoint again with `model.save_pretrained(DIR)` from the model it describes."
        )


def _names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


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
    `<name>.data` beside the graph, file to file (aim/weights.py). Below it the weights are in the
    graph as written, and go to `<name>.data` likewise: at any size the graphs of a build share one
    copy of the weights, and the graph passes never read them.
    """
    import onnx
    import torch

    path = Path(path)
    names = [spec.name for spec in input_specs]
    dynamic_axes = {spec.name: spec.dynamic_axes for spec in (*input_specs, *output_specs)}
    scratch = path.with_name(f".{path.name}.torch.tmp-{os.getpid()}")  # a leftover files.remove_leftovers knows
    remove(scratch)
    made = make_folder(path.parent)
    scratch.mkdir()
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
        save_model(model, path, weights_dir=scratch, check=False, external=True)
    except BaseException:
        remove(scratch)
        remove_empty(made)  # a failed export leaves no folder made for it either
        raise
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
