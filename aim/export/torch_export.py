"""Build or load a model of a registered family and trace it to ONNX with torch.onnx."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from aim.errors import CheckpointError
from aim.families.base import ExportConfig
from aim.graph_passes.io import atomic_path


def load_model(config: ExportConfig, checkpoint: str | os.PathLike | None = None, seed: int = 0):
    """The family's model in eval mode: random weights from its tiny config (seeded), or a local
    `save_pretrained` folder. Nothing is downloaded."""
    if checkpoint is None:
        torch.manual_seed(seed)
        return config.build_tiny().eval()
    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder} is not a checkpoint folder: it has no config.json. "
            f"Pass a folder written by `model.save_pretrained(DIR)`."
        )
    expected = config.model_class.config_class.model_type
    found = json.loads((folder / "config.json").read_text()).get("model_type")
    if found != expected:
        raise CheckpointError(
            f"{folder} holds a {found!r} model, but MODEL={config.name} expects {expected!r}. "
            f"Pick the model family that matches the checkpoint."
        )
    try:
        return config.model_class.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as error:
        raise CheckpointError(f"could not load the checkpoint in {folder}: {error}") from error


def example_inputs(config: ExportConfig, model, seed: int = 0, **sizes: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return config.make_inputs(model, config.sizes(**sizes), generator)


def export_onnx(config: ExportConfig, model, path: str | os.PathLike) -> Path:
    """Trace `model` to ONNX at `path` with every dynamic dim of the config left symbolic.

    The legacy TorchScript exporter is used: it is several times faster than dynamo for these models
    and gives the dynamic axes by name. The file is written to a temporary name and renamed.
    """
    path = Path(path)
    module = config.wrap(model).eval()
    inputs = example_inputs(config, model, **config.verify_sizes)
    input_specs, output_specs = config.input_specs(model), config.output_specs(model)
    names = [spec.name for spec in input_specs]
    dynamic_axes = {spec.name: spec.dynamic_axes for spec in (*input_specs, *output_specs)}
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings(), config.export_context():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module,
            tuple(inputs[name] for name in names),
            str(tmp),
            input_names=names,
            output_names=[spec.name for spec in output_specs],
            dynamic_axes=dynamic_axes,
            opset_version=config.opset,
            dynamo=False,
        )
    return path


def reference_logits(config: ExportConfig, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The PyTorch model's logits for `inputs`, as the exported graph computes them."""
    outputs = reference_outputs(config, model, inputs)
    return outputs[0] if isinstance(outputs, tuple) else outputs


def reference_outputs(config: ExportConfig, model, inputs: dict[str, torch.Tensor]):
    """Every output of the wrapped PyTorch model (the logits first; a tuple if there are several)."""
    with torch.no_grad():
        return config.wrap(model).eval()(*(inputs[spec.name] for spec in config.input_specs(model)))
