"""Models that have learned something: seeded training on package-shipped or generated data, cached.

`train("resnet")` trains a small ResNet on digits, `train("segformer")` a small SegFormer on the
synthetic shapes, `train("llama")` a tiny Llama on the standard library's documentation text with a
locally trained BPE tokenizer. Each writes a `save_pretrained` checkpoint (plus tokenizer for Llama)
and `training.json` (settings, clean metric, seconds) to build/trained/<model>/, which
`make engine MODEL=<model> CHECKPOINT=build/trained/<model>` builds as it would a real checkpoint.
A second call with the same settings reuses the folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aim.errors import AimError
from aim.evaluation.datasets import Split
from aim.evaluation.task_evaluation import evaluation_of
from aim.families import get_family
from aim.files import StagedFolder, check_writable
from aim.tasks import get_task

TRAINED = Path("build") / "trained"
TRAINING = "training.json"


def clean_metric(evaluation, model, split: Split, num_classes: int, batch: int = 64) -> float:
    """The clean metric of a PyTorch model on a split: accuracy, mIoU or next-token accuracy."""
    import torch

    model.eval()
    predicted = []
    with torch.no_grad():
        for start in range(0, len(split), batch):
            part = split.take(slice(start, start + batch))
            predicted.append(
                evaluation.predictions(
                    evaluation.training_logits(model, {k: torch.tensor(v) for k, v in part.inputs.items()})
                )
            )
    return evaluation.clean_metric(np.concatenate(predicted), split.labels, num_classes)


def train(
    model: str,
    out_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Trains (or reuses) the family's model; returns training.json's content, with "checkpoint"."""
    import torch

    family = get_family(model)
    if family.trained is None:
        raise AimError(f"{model} has no training recipe (Family.trained)")
    evaluation, recipe = evaluation_of(family.task), family.trained
    steps = recipe.steps if steps is None else steps
    if steps < 1:
        raise AimError(f"--steps must be at least 1, got {steps}")
    folder = Path(out_dir) if out_dir else TRAINED / model
    check_writable(folder)  # before minutes of training
    settings = {
        "model": model,
        "steps": steps,
        "seed": seed,
        "lr": recipe.lr,
        "batch": recipe.batch,
        "version": recipe.version,
    }
    record = folder / TRAINING
    if not force and record.is_file():
        cached = json.loads(record.read_text())
        if cached.get("settings") == settings and (folder / "config.json").is_file():
            log(f"trained {model} reused from {folder} ({evaluation.metric} {cached['clean_metric']:.4f})")
            return {**cached, "checkpoint": str(folder)}

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    data = evaluation.training_data(recipe, seed, train_inputs=steps * recipe.batch)
    net = family.build(evaluation.model_config(recipe, data)).train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=0.01)
    # warm-up over 10% of the steps (at least 3 steps: OneCycleLR needs a non-empty warm-up phase)
    if steps >= 6:
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=recipe.lr, total_steps=steps, pct_start=max(0.1, 3 / steps)
        )
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda _: 1.0)
    log(
        f"training {model}: {steps} steps, batch {recipe.batch}, {sum(p.numel() for p in net.parameters()):,} "
        "parameters"
    )
    batches = evaluation.training_batches(data, recipe.batch, rng)
    for step in range(1, steps + 1):
        inputs, labels = next(batches)
        loss = evaluation.loss(evaluation.training_logits(net, inputs), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            log(f"  step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f} s")
    seconds = time.perf_counter() - started
    value = clean_metric(evaluation, net, data["test"], get_task(family.task).num_classes(net))
    log(f"  clean {evaluation.metric} on the test split: {value:.4f} ({len(data['test'])} samples)")

    result = {
        "settings": settings,
        "metric": evaluation.metric,
        "clean_metric": value,
        "test_samples": len(data["test"]),
        "train_seconds": round(seconds, 1),
    }
    with StagedFolder(folder, lambda found: (found / TRAINING).is_file(), what="a model `aim train` wrote") as staged:
        net.eval().save_pretrained(staged.path)
        if "tokenizer" in data:
            data["tokenizer"].save_pretrained(staged.path)
        (staged.path / TRAINING).write_text(json.dumps(result, indent=2) + "\n")
        staged.publish()
    return {**result, "checkpoint": str(folder)}
