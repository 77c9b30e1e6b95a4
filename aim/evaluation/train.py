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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from aim.errors import AimError
from aim.evaluation import datasets, metrics

TRAINED = Path("build") / "trained"
TRAINING = "training.json"


@dataclass(frozen=True)
class Recipe:
    name: str
    metric: str  # the clean metric reported: accuracy, mIoU, next-token accuracy
    steps: int  # full training (make eval / make train)
    build: Callable[[], torch.nn.Module]
    lr: float
    batch: int
    version: int  # bumped when the family's data or recipe changes, so that cached checkpoints are retrained


# ---------------------------------------------------------------- models (small configs, own class counts)
def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(
        ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic", num_labels=10)
    )


def _segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_channels=3,
        depths=[1, 1, 1, 1],
        hidden_sizes=[16, 32, 64, 128],
        num_attention_heads=[1, 1, 2, 4],
        decoder_hidden_size=64,
        num_labels=len(datasets.SHAPE_CLASSES),
        id2label=dict(enumerate(datasets.SHAPE_CLASSES)),
        label2id={name: i for i, name in enumerate(datasets.SHAPE_CLASSES)},
    )
    return SegformerForSemanticSegmentation(config)


LLAMA_VOCAB = 1024


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=LLAMA_VOCAB,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


RECIPES = {
    "resnet": Recipe("resnet", "accuracy", steps=300, build=_resnet, lr=2e-3, batch=64, version=2),
    "segformer": Recipe("segformer", "mIoU", steps=600, build=_segformer, lr=2e-3, batch=16, version=3),
    "llama": Recipe("llama", "next-token accuracy", steps=400, build=_llama, lr=3e-3, batch=32, version=3),
}


def recipe(model: str) -> Recipe:
    if model not in RECIPES:
        raise AimError(f"no training recipe for {model!r}; models with one: {', '.join(sorted(RECIPES))}")
    return RECIPES[model]


# ---------------------------------------------------------------- data per family
def load_data(model: str, seed: int = 0, checkpoint: str | os.PathLike | None = None, train_images: int | None = None) -> dict:
    """The family's splits; for Llama the tokenizer comes from `checkpoint` if it has one, else is
    trained. `train_images` caps the generated SegFormer training set (short runs need fewer)."""
    if model == "resnet":
        return datasets.digits(seed)
    if model == "segformer":
        sizes = dict(datasets.SHAPES_SPLITS)
        sizes["train"] = min(sizes["train"], train_images or sizes["train"])
        return datasets.shapes(seed, sizes)
    if model == "llama":
        tokenizer = load_tokenizer(checkpoint) if checkpoint else datasets.train_tokenizer(datasets.corpus_text(), LLAMA_VOCAB)
        return {"tokenizer": tokenizer, **datasets.corpus(tokenizer, seed)}
    raise AimError(f"no data set for {model!r}")


def load_tokenizer(checkpoint):
    from transformers import PreTrainedTokenizerFast

    path = Path(checkpoint)
    if not (path / "tokenizer.json").is_file():
        raise AimError(f"{path} has no tokenizer.json: the Llama evaluation needs the checkpoint's tokenizer")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _batches(model: str, data: dict, batch: int, rng: np.random.Generator):
    """Endless (inputs, labels) batches of the train split."""
    if model == "llama":
        ids = data["train"]
        length = 64
        while True:
            starts = rng.integers(0, len(ids) - length - 1, size=batch)
            window = torch.tensor(ids[starts[:, None] + np.arange(length + 1)])
            yield {"input_ids": window[:, :-1]}, window[:, 1:]
    train = data["train"]
    while True:
        for index in np.array_split(rng.permutation(len(train)), max(1, len(train) // batch)):
            part = train.take(index)
            yield {k: torch.tensor(v) for k, v in part.inputs.items()}, torch.tensor(part.labels)


def logits_torch(model_name: str, model, inputs: dict) -> torch.Tensor:
    """Logits as the deployed engine sees them: [B, C]; [B, C, H, W] at input size; [B, V] last token."""
    if model_name == "resnet":
        return model(pixel_values=inputs["pixel_values"]).logits
    if model_name == "segformer":
        out = model(pixel_values=inputs["pixel_values"]).logits
        return F.interpolate(out, size=inputs["pixel_values"].shape[-2:], mode="bilinear", align_corners=False)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False).logits
    return out


def _loss(model_name: str, model, inputs, labels) -> torch.Tensor:
    logits = logits_torch(model_name, model, inputs)
    if model_name == "llama":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return F.cross_entropy(logits, labels)


def clean_metric(model_name: str, model, split: datasets.Split, batch: int = 64) -> float:
    """The clean metric of a PyTorch model on a split: accuracy, mIoU or next-token accuracy."""
    model.eval()
    predicted = []
    with torch.no_grad():
        for start in range(0, len(split), batch):
            part = split.take(slice(start, start + batch))
            logits = logits_torch(model_name, model, {k: torch.tensor(v) for k, v in part.inputs.items()})
            if model_name == "llama":
                logits = logits[:, -1]
            predicted.append(logits.argmax(1).numpy())
    predicted = np.concatenate(predicted)
    if model_name == "segformer":
        return metrics.mean_iou(predicted, split.labels, len(datasets.SHAPE_CLASSES))
    return metrics.accuracy(predicted, split.labels)


# ---------------------------------------------------------------- training
def train(
    model: str,
    out_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Trains (or reuses) the family's model; returns training.json's content, with "checkpoint"."""
    spec = recipe(model)
    steps = spec.steps if steps is None else steps
    folder = Path(out_dir) if out_dir else TRAINED / model
    settings = {"model": model, "steps": steps, "seed": seed, "lr": spec.lr, "batch": spec.batch, "version": spec.version}
    record = folder / TRAINING
    if not force and record.is_file():
        cached = json.loads(record.read_text())
        if cached.get("settings") == settings and (folder / "config.json").is_file():
            log(f"trained {model} reused from {folder} ({spec.metric} {cached['clean_metric']:.4f})")
            return {**cached, "checkpoint": str(folder)}

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    data = load_data(model, seed, train_images=steps * spec.batch)
    net = spec.build().train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=0.01)
    # warm-up over 10% of the steps (at least 3 steps: OneCycleLR needs a non-empty warm-up phase)
    if steps >= 6:
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=spec.lr, total_steps=steps, pct_start=max(0.1, 3 / steps))
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda _: 1.0)
    log(f"training {model}: {steps} steps, batch {spec.batch}, {sum(p.numel() for p in net.parameters()):,} parameters")
    batches = _batches(model, data, spec.batch, rng)
    for step in range(1, steps + 1):
        inputs, labels = next(batches)
        loss = _loss(model, net, inputs, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            log(f"  step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f} s")
    seconds = time.perf_counter() - started
    value = clean_metric(model, net, data["test"])
    log(f"  clean {spec.metric} on the test split: {value:.4f} ({len(data['test'])} samples)")

    result = {"settings": settings, "metric": spec.metric, "clean_metric": value, "test_samples": len(data["test"]), "train_seconds": round(seconds, 1)}
    staging = folder.with_name(f".{folder.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    net.eval().save_pretrained(staging)
    if model == "llama":
        data["tokenizer"].save_pretrained(staging)
    (staging / TRAINING).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, folder)
    return {**result, "checkpoint": str(folder)}
