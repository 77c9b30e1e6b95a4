"""A family record for a checkpoint folder that names no family: `make engine CHECKPOINT=dir`.

The folder's config.json gives the architecture, its task and its transformers class
(architectures.py, through Optimum's TasksManager); the record inherits everything else from the
task, as a family does, except where the checkpoint itself says otherwise (an image architecture
that takes one input size only). Nothing is registered: the record lives for the build.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from aim.errors import CheckpointError
from aim.families import Family
from aim.families.architectures import architecture_of
from aim.tasks import get_task


def build_name(folder: str | os.PathLike) -> str:
    """The build's folder name under OUT: the checkpoint folder's own name, characters other than
    letters, digits, `.`, `_` and `-` replaced by `-` (it also names the Triton model)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(folder).resolve().name).strip(".-")
    if not name:
        raise CheckpointError(f"{folder}: cannot name a build after this folder; rename it or pass MODEL")
    return name


def checkpoint_family(folder: str | os.PathLike, log=None) -> Family:
    """The family record of the model in a `save_pretrained` folder, or a CheckpointError that says why
    its architecture is refused and which are supported."""
    from aim.export.torch_export import checkpoint_config

    config = checkpoint_config(folder)
    architecture = architecture_of(config, str(folder))
    dims, sizes = get_task(architecture.task).checkpoint_dims(config, architecture.fixed_image_size, Path(folder))
    if log is not None and not architecture.tested:
        log(
            f"note: {architecture.model_type} is not among the tested architectures; the verification against "
            "PyTorch decides"
        )
    return Family(
        name=build_name(folder),
        task=architecture.task,
        model_class=architecture.model_class,
        tiny=None,
        model_type=architecture.model_type,
        dims=dims,
        verify_sizes=sizes,
        architecture=architecture,
    )
