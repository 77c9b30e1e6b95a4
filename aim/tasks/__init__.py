"""Tasks: what a model of a task is traced as and verified by, one object per task.

    image-classification     logits [B, C]
    semantic-segmentation    logits [B, C, H, W] at the input's size (upsampled in the graph)
    text-generation          next-token logits [B, V], KV cache (decoded by aim/generation)

Families name their task by string and inherit its defaults; `get_task(name)` gives the object. How
a model of each task is trained and evaluated is aim/evaluation/task_evaluation.py. Importing this
package imports no torch or transformers.
"""

from __future__ import annotations

from aim.errors import UnknownModelError
from aim.tasks.base import Task
from aim.tasks.image import ImageClassification, SemanticSegmentation
from aim.tasks.text_generation import TextGeneration

TASKS: dict[str, Task] = {task.name: task for task in (ImageClassification(), SemanticSegmentation(), TextGeneration())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownModelError(f"unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}") from None
