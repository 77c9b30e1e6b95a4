"""Model families and their export to ONNX. Importing this package registers every family."""

from aim.families import llama, resnet, segformer  # noqa: F401  (registration)
from aim.families.base import Agreement, DimRange, ExportConfig, TensorSpec, Tolerance, get_config, list_models, register
from aim.export.torch_export import example_inputs, export_onnx, load_model, reference_logits

__all__ = [
    "Agreement",
    "DimRange",
    "ExportConfig",
    "TensorSpec",
    "Tolerance",
    "example_inputs",
    "export_onnx",
    "get_config",
    "list_models",
    "load_model",
    "reference_logits",
    "register",
]
