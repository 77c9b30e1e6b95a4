"""How a model of each task is trained and evaluated: its data, loss, metric and imperceptible variants.

One object per task, looked up by the task's name (`evaluation_of`), beside the task object that says
how a model of the task is traced and verified (aim/tasks). The data is package-shipped or generated
(evaluation/datasets.py), never downloaded:

    image-classification     scikit-learn's digits, accuracy; variants: 1, 4 or 16 8-bit levels per pixel
    semantic-segmentation    synthetic shapes labelled per pixel, mIoU; the same variants
    text-generation          the standard library's documentation through a BPE trained here,
                             next-token accuracy; variants: leading whitespace, one word's case, a synonym
"""

from __future__ import annotations

import itertools

import numpy as np

from aim.errors import AimError, UnknownModelError
from aim.evaluation import datasets, metrics
from aim.tasks import get_task

PIXELS = "pixel_values"
LEVEL = 2.0 / 255.0  # one 8-bit intensity level of the data's -1..1 pixel range
TRAIN_WINDOW = 64  # tokens per training sequence


class TaskEvaluation:
    task: str = ""  # the name of the task in aim.tasks
    metric: str = "accuracy"  # the clean metric of a trained model
    utility_grid: str = "classification"  # the eval sweep's sigma grid (docs/method.md §1)
    segmentation: bool = False  # measured per pixel: mIoU besides accuracy
    perturbation: str = ""  # what `variants` changes by default, in words
    perturbations: dict[str, str] = {}  # every kind of variant -> what it changes (the first is the default)

    # -- training

    def training_data(self, trained, seed: int = 0, checkpoint=None, train_inputs: int | None = None) -> dict:
        """{"train", "calibration", "test"} splits (and whatever else training needs)."""
        raise NotImplementedError

    def model_config(self, trained, data: dict):
        """The family's trained config sized for the task's data (`trained`: the family's Trained)."""
        raise NotImplementedError

    def training_batches(self, data: dict, batch: int, rng):
        """Endless (inputs, labels) batches of torch tensors from the train split."""
        raise NotImplementedError

    def training_logits(self, model, inputs: dict):
        """The logits the loss sees (as the engine computes them)."""
        raise NotImplementedError

    def loss(self, logits, labels):
        import torch.nn.functional as F

        return F.cross_entropy(logits, labels)

    def predictions(self, logits):
        """The clean metric's predictions from training_logits (a numpy array)."""
        return logits.argmax(1).numpy()

    def clean_metric(self, predicted, labels, num_classes: int) -> float:
        return metrics.accuracy(predicted, labels)

    # -- evaluation through an engine

    def eval_split(self, engine, checkpoint, split: str, seed: int = 0, count: int | None = None) -> datasets.Split:
        """A labelled split of the task's data shaped for `engine`."""
        raise NotImplementedError

    def variants(self, engine, inputs: dict, count: int, checkpoint, seed: int = 0, kind: str | None = None):
        """`count` imperceptible variants of the eval inputs `inputs` (shaped for `engine`), one by one
        (the averaging attack, evaluation/attack.py); `kind`: one of `perturbations` (default: the first)."""
        raise NotImplementedError

    def _kind(self, kind: str | None) -> str:
        if kind is None:
            return next(iter(self.perturbations))
        if kind not in self.perturbations:
            raise AimError(f"no variants of kind {kind!r} for {self.task}; kinds: {', '.join(self.perturbations)}")
        return kind


def _levels(count: int) -> str:
    plural = "s" if count > 1 else ""
    return f"every pixel value moved by {count} 8-bit intensity level{plural} ({count}/255 of its range), up or down"


class _ImageEvaluation(TaskEvaluation):
    perturbations = {f"levels-{n}": _levels(n) for n in (1, 4, 16)}
    perturbation = perturbations["levels-1"]

    def model_config(self, trained, data: dict):
        return trained.config(labels=data["labels"], channels=data["channels"])

    def training_batches(self, data: dict, batch: int, rng):
        import torch

        train = data["train"]
        while True:
            for index in np.array_split(rng.permutation(len(train)), max(1, len(train) // batch)):
                part = train.take(index)
                yield {k: torch.tensor(v) for k, v in part.inputs.items()}, torch.tensor(part.labels)

    def training_logits(self, model, inputs: dict):
        """The logits with gradients, as the engine computes them (resized to the input if the task asks)."""
        logits = model(pixel_values=inputs[PIXELS]).logits
        if get_task(self.task).upsample_logits_to:
            from aim.graph_passes.upsample import upsample_torch

            logits = upsample_torch(logits, inputs[PIXELS].shape[2:])
        return logits

    def variants(self, engine, inputs: dict, count: int, checkpoint, seed: int = 0, kind: str | None = None):
        step = LEVEL * int(self._kind(kind).split("-")[1])
        rng = np.random.default_rng(seed)
        for _ in range(count):
            yield {
                **inputs,
                PIXELS: inputs[PIXELS] + rng.choice(np.float32([-step, step]), size=inputs[PIXELS].shape),
            }


class ImageClassificationEvaluation(_ImageEvaluation):
    """Digits from scikit-learn (10 classes, upsampled to 32x32)."""

    task = "image-classification"

    def training_data(self, trained, seed: int = 0, checkpoint=None, train_inputs: int | None = None) -> dict:
        return {**datasets.digits(seed), "labels": datasets.DIGIT_CLASSES, "channels": 1}

    def eval_split(self, engine, checkpoint, split: str, seed: int = 0, count: int | None = None) -> datasets.Split:
        channels = engine.inputs[PIXELS][1][1]
        data = datasets.digits(seed, channels=channels if isinstance(channels, int) else 1)[split]
        return data if count is None else data.take(slice(0, count))


class SemanticSegmentationEvaluation(_ImageEvaluation):
    """Synthetic shapes (5 classes, 64x64, labelled per pixel)."""

    task = "semantic-segmentation"
    metric = "mIoU"
    segmentation = True

    def training_data(self, trained, seed: int = 0, checkpoint=None, train_inputs: int | None = None) -> dict:
        sizes = dict(datasets.SHAPES_SPLITS)
        sizes["train"] = min(sizes["train"], train_inputs or sizes["train"])  # short runs need fewer
        return {**datasets.shapes(seed, sizes), "labels": datasets.SHAPE_CLASSES, "channels": 3}

    def clean_metric(self, predicted, labels, num_classes: int) -> float:
        return metrics.mean_iou(predicted, labels, num_classes)

    def eval_split(self, engine, checkpoint, split: str, seed: int = 0, count: int | None = None) -> datasets.Split:
        return datasets.shapes(seed, {split: count if count is not None else datasets.SHAPES_SPLITS[split]})[split]


class TextGenerationEvaluation(TaskEvaluation):
    """The standard library's documentation, tokenised by a BPE trained here (or the checkpoint's own)."""

    task = "text-generation"
    metric = "next-token accuracy"
    utility_grid = "language"
    # Whitespace before the context, not after it: a trailing space is part of the next token to a
    # BPE model and asks another question (measured: 3% of next tokens agree with the original's).
    perturbations = {
        "whitespace": "leading whitespace: the k-th shortest string of spaces, newlines and tabs before the context "
        "(as its own tokens)",
        "case": "the case of one word of the context flipped (the k-th word but the last, lower <-> Capitalised)",
        "synonym": "one word of the context replaced by a synonym from a small table (the k-th of the context's "
        "candidates; a context with none is sent as it is)",
    }
    perturbation = perturbations["whitespace"]

    def training_data(self, trained, seed: int = 0, checkpoint=None, train_inputs: int | None = None) -> dict:
        vocab = trained.config().vocab_size
        tokenizer = load_tokenizer(checkpoint) if checkpoint else datasets.corpus_tokenizer(vocab)
        return {"tokenizer": tokenizer, **datasets.corpus(tokenizer, seed)}

    def model_config(self, trained, data: dict):
        return trained.config()

    def training_batches(self, data: dict, batch: int, rng):
        import torch

        ids = data["train"]
        while True:
            starts = rng.integers(0, len(ids) - TRAIN_WINDOW - 1, size=batch)
            window = torch.tensor(ids[starts[:, None] + np.arange(TRAIN_WINDOW + 1)])
            yield {"input_ids": window[:, :-1]}, window[:, 1:]

    def training_logits(self, model, inputs: dict):
        """Logits of every position [B, S, V] (the loss sees every next token)."""
        return model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False).logits

    def loss(self, logits, labels):
        import torch.nn.functional as F

        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def predictions(self, logits):
        return logits[:, -1].argmax(-1).numpy()

    def eval_split(self, engine, checkpoint, split: str, seed: int = 0, count: int | None = None) -> datasets.Split:
        """Windows of the corpus, each a prefill step of the KV-cache export (positions and an empty
        cache added), labelled with the token that follows."""
        from aim.generation.loop import prefill_inputs

        data = datasets.corpus(load_tokenizer(checkpoint), seed)[split]
        if count is not None:
            data = data.take(slice(0, count))
        return datasets.Split(
            prefill_inputs(engine, data.inputs["input_ids"], data.inputs["attention_mask"]), data.labels
        )

    def variants(self, engine, inputs: dict, count: int, checkpoint, seed: int = 0, kind: str | None = None):
        from aim.generation.loop import prefill_inputs

        kind = self._kind(kind)
        tokenizer = load_tokenizer(checkpoint)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if kind == "whitespace":
            for prefix in whitespace(count):
                extra = np.asarray(tokenizer(prefix, add_special_tokens=False)["input_ids"], dtype=ids.dtype)
                extra = np.broadcast_to(extra, (ids.shape[0], extra.size))
                yield prefill_inputs(
                    engine, np.concatenate([extra, ids], axis=1), np.concatenate([np.ones_like(extra), mask], axis=1)
                )
            return
        texts = [tokenizer.decode(row[row_mask > 0]) for row, row_mask in zip(ids, mask)]
        edit = flip_case if kind == "case" else use_synonym
        for k in range(count):
            encoded = [tokenizer(edit(text, k), add_special_tokens=False)["input_ids"] for text in texts]
            width = max(map(len, encoded))
            pad = tokenizer.pad_token_id or 0
            padded = np.array([[pad] * (width - len(e)) + e for e in encoded], dtype=ids.dtype)  # left padding
            attention = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded], dtype=mask.dtype)
            yield prefill_inputs(engine, padded, attention)


# A small table of synonyms (words of the standard library's documentation): no download.
SYNONYMS = {
    "value": "amount",
    "used": "employed",
    "new": "fresh",
    "given": "supplied",
    "specified": "stated",
    "called": "invoked",
    "following": "next",
    "same": "identical",
    "different": "distinct",
    "large": "big",
    "small": "little",
    "empty": "blank",
    "first": "initial",
    "last": "final",
    "only": "just",
    "error": "failure",
    "returns": "gives",
    "number": "count",
    "name": "label",
    "create": "make",
    "created": "made",
    "change": "alter",
    "show": "display",
    "allows": "permits",
    "ignored": "skipped",
    "usually": "normally",
    "always": "invariably",
    "often": "frequently",
    "begin": "start",
    "end": "finish",
    "part": "portion",
    "whole": "entire",
    "simple": "plain",
    "result": "outcome",
    "useful": "handy",
    "important": "significant",
    "possible": "feasible",
    "several": "various",
    "many": "numerous",
    "get": "obtain",
    "keep": "retain",
    "need": "require",
    "needed": "required",
    "check": "verify",
    "find": "locate",
    "found": "located",
    "give": "provide",
    "gives": "provides",
    "method": "procedure",
    "example": "sample",
    "object": "item",
    "true": "correct",
    "contains": "holds",
    "uses": "employs",
    "must": "has to",
    "cannot": "can not",
    "raised": "thrown",
}


def _words(text: str) -> list[tuple[int, int]]:
    """Spans of the alphabetic words of `text`, but the last (the next token continues it)."""
    import re

    return [m.span() for m in re.finditer(r"[A-Za-z]+", text)][:-1]


def flip_case(text: str, k: int) -> str:
    """The k-th word (cyclically) lower-cased if it has a capital, else Capitalised."""
    spans = _words(text)
    if not spans:
        return text
    start, end = spans[k % len(spans)]
    word = text[start:end]
    return text[:start] + (word.lower() if word != word.lower() else word.capitalize()) + text[end:]


def use_synonym(text: str, k: int) -> str:
    """The k-th word (cyclically) of those in SYNONYMS replaced by its synonym; no candidate: `text` itself."""
    spans = [(s, e) for s, e in _words(text) if text[s:e].lower() in SYNONYMS]
    if not spans:
        return text
    start, end = spans[k % len(spans)]
    word = text[start:end]
    other = SYNONYMS[word.lower()]
    return text[:start] + (other.capitalize() if word[0].isupper() else other) + text[end:]


def whitespace(count: int) -> list[str]:
    """The `count` shortest strings of spaces, newlines and tabs, shortest first."""
    found = []
    for length in itertools.count(1):
        found += ["".join(chars) for chars in itertools.product(" \n\t", repeat=length)]
        if len(found) >= count:
            return found[:count]


def load_tokenizer(checkpoint):
    """A trained checkpoint's tokenizer (tokenizer.json beside the weights)."""
    from pathlib import Path

    path = Path(checkpoint)
    if not (path / "tokenizer.json").is_file():
        raise AimError(f"{path} has no tokenizer.json: the evaluation of a text model needs the checkpoint's tokenizer")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


EVALUATIONS: dict[str, TaskEvaluation] = {
    each.task: each
    for each in (ImageClassificationEvaluation(), SemanticSegmentationEvaluation(), TextGenerationEvaluation())
}


def evaluation_of(task: str) -> TaskEvaluation:
    """How a model of `task` (a task's name) is trained and evaluated."""
    try:
        return EVALUATIONS[task]
    except KeyError:
        known = ", ".join(sorted(EVALUATIONS))
        raise UnknownModelError(
            f"no training or evaluation data for the task {task!r}; tasks that have them: {known}"
        ) from None
