"""Architectures a checkpoint folder may hold, by task: which are tested (the architecture matrix
builds each one, tests/families/test_architectures.py), which are refused and why, and which image
architectures only take the input size they were trained at.

The task and the transformers class of a checkpoint come from its config.json (`architectures`,
`model_type`) through Optimum's TasksManager, which maps every transformers class to its task;
nothing here is per-architecture code. An architecture neither tested nor refused is tried: the
build's verification against PyTorch decides, as it does for the tested ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from aim.errors import CheckpointError

# Our task -> Optimum's task whose transformers classes serve it.
OPTIMUM_TASKS = {
    "image-classification": "image-classification",
    "semantic-segmentation": "semantic-segmentation",
    "text-generation": "text-generation",
}

TESTED = {
    "image-classification": ("convnext", "efficientnet", "mobilenet_v2", "resnet", "swin", "vit"),
    "semantic-segmentation": (
        "beit",
        "data2vec-vision",
        "dpt",
        "mobilenet_v2",
        "mobilevit",
        "mobilevitv2",
        "segformer",
        "upernet",
    ),
    "text-generation": (
        "falcon",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "gpt_neox",
        "llama",
        "mistral",
        "opt",
        "phi3",
        "qwen2",
        "qwen3",
    ),
}

# Text-generation architectures whose reduced-precision builds export through torch.onnx's dynamo
# exporter on a FakeTensor model, the weights attached from the safetensors (export/fake_export.py;
# tests/export/test_fake_export.py): no FP32 copy of the weights. Others load and export in FP32.
FAKE_EXPORTED = ("llama", "mistral", "qwen2")

# Image architectures that take one input size only, the checkpoint's (height and width are static in
# the graph): position embeddings sized for it, or a head the TorchScript exporter can trace only at a
# known size (UperNet's pyramid pooling, AdaptiveAvgPool2d to 1, 2, 3 and 6 cells).
FIXED_IMAGE_SIZE = {
    "vit": "absolute position embeddings of image_size / patch_size patches",
    "beit": "relative position bias tables sized for image_size / patch_size patches; segmentation: UperNet's "
    "pyramid pooling",
    "data2vec-vision": "relative position bias tables sized for image_size / patch_size patches; "
    "segmentation: UperNet's pyramid pooling",
    "dpt": "its ViT backbone's position embeddings and the reassembled feature maps",
    "upernet": "its pyramid pooling (AdaptiveAvgPool2d to 1, 2, 3, 6 cells) exports only at a known input size",
}

REFUSED = {
    "timm_wrapper": "loads its network from timm, which needs torchvision (not installable beside the CPU torch here)",
    "imagegpt": "classifies colour-cluster token ids (input_ids), not pixel_values",
    "perceiver": "its image classifiers take `inputs` preprocessed per variant (Fourier, conv, learned), not "
    "pixel_values",
    "gemma3": "an image-text-to-text model (Gemma3ForConditionalGeneration); text-only Gemma 3 checkpoints "
    "(model_type gemma3_text) are supported",
    "mamba": "a state-space model: it carries a recurrent state, not a KV cache",
    "mamba2": "a state-space model: it carries a recurrent state, not a KV cache",
    "falcon_mamba": "a state-space model: it carries a recurrent state, not a KV cache",
    "rwkv": "a recurrent model: it carries a recurrent state, not a KV cache",
    "recurrent_gemma": "a recurrent model: it carries a recurrent state, not a KV cache",
    "xlstm": "a recurrent model: it carries a recurrent state, not a KV cache",
}


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint holds: its architecture, the task it serves and the transformers class that loads it."""

    model_type: str
    task: str  # one of OPTIMUM_TASKS
    model_class: str
    tested: bool
    fixed_image_size: bool


def supported() -> str:
    """The tested architectures by task, one line each (for error messages and `aim models`)."""
    return "; ".join(f"{task}: {', '.join(names)}" for task, names in TESTED.items())


def _class_tasks() -> dict[str, dict[str, tuple[str, ...]]]:
    """Our task -> {model_type: its transformers class names, the default first}, from Optimum's TasksManager."""
    from optimum.exporters.tasks import TasksManager

    mappings = TasksManager._TRANSFORMERS_TASKS_TO_MODEL_MAPPINGS  # task -> {model_type: class name or names}
    return {
        ours: {
            model_type: (names,) if isinstance(names, str) else tuple(names)
            for model_type, names in mappings.get(theirs, {}).items()
        }
        for ours, theirs in OPTIMUM_TASKS.items()
    }


def _optimum_task_of(class_name: str) -> str:
    """Optimum's task of a transformers class outside our tasks (for the refusal's message)."""
    import transformers
    from optimum.exporters.tasks import TasksManager

    try:
        return TasksManager.infer_task_from_model(getattr(transformers, class_name))
    except (AttributeError, ValueError, KeyError):
        return "unknown"


def architecture_of(config: dict, where: str = "the checkpoint") -> Architecture:
    """The architecture of a checkpoint's config.json (a dict), or a CheckpointError saying why it is
    refused and which architectures are supported."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(
            f"{where}: config.json has no model_type. Save the model with `save_pretrained`. Supported: {supported()}."
        )
    if model_type in REFUSED:
        raise CheckpointError(
            f"{where} holds a {model_type!r} model, which is refused: {REFUSED[model_type]}. Supported: {supported()}."
        )
    classes = _class_tasks()
    named = config.get("architectures") or []
    class_name = named[0] if named and isinstance(named[0], str) else None
    if class_name is not None:
        tasks = [task for task, mapping in classes.items() if any(class_name in names for names in mapping.values())]
        if not tasks:
            raise CheckpointError(
                f"{where} holds a {class_name} ({_optimum_task_of(class_name)}), which has no logits of the tasks "
                f"{', '.join(OPTIMUM_TASKS)}: save the model with its head (e.g. *ForCausalLM, "
                "*ForImageClassification, "
                f"*ForSemanticSegmentation). Supported: {supported()}."
            )
    else:  # no architectures field: the model_type decides if it serves exactly one of the tasks
        tasks = [task for task, mapping in classes.items() if model_type in mapping]
        if len(tasks) != 1:
            raise CheckpointError(
                f"{where}: config.json names no architecture and model_type {model_type!r} "
                + (f"serves several tasks ({', '.join(tasks)})" if tasks else "serves none of the tasks")
                + f". Save the model with `save_pretrained` (it writes `architectures`). Supported: {supported()}."
            )
        class_name = classes[tasks[0]][model_type][0]
    task = tasks[0]
    return Architecture(model_type, task, class_name, model_type in TESTED[task], model_type in FIXED_IMAGE_SIZE)
