"""Data that needs no download: every set is generated here or read from an installed package.

- digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), upsampled to
  32x32 (the smallest image the ResNet profile takes) and standardised.
- shapes: a synthetic segmentation set generated in code: discs, squares, triangles and rings on
  textured (striped, noisy) backgrounds, labelled per pixel (5 classes). Each class has its own
  colour, jittered per shape, so that a small model learns the set in a minute or two; the shape
  tells neighbouring classes apart where colours overlap.
- corpus: the Python standard library's own documentation text (`pydoc_data.topics`, ~465k
  characters of English prose about Python), tokenised by a byte-level BPE trained here with
  `tokenizers`.

Every split is a deterministic function of a seed. Splits: train / calibration / test; calibration
inputs are used unlabelled (utility-level calibration), test inputs for the sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "calibration", "test")


@dataclass
class Split:
    inputs: dict[str, np.ndarray]  # the engine's inputs, batch first
    labels: np.ndarray  # [B] class per image, [B, H, W] class per pixel, or [B] next token

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index) -> Split:
        return Split({k: v[index] for k, v in self.inputs.items()}, self.labels[index])


# ---------------------------------------------------------------- digits (image classification)
DIGITS_SIZE = 32
DIGIT_CLASSES = tuple(str(digit) for digit in range(10))


def digits(seed: int = 0, size: int = DIGITS_SIZE, channels: int = 1) -> dict[str, Split]:
    """sklearn's digits, 60/20/20 split, as [B, channels, size, size] float32 (bilinear upsampling)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).repeat(1, channels, 1, 1).numpy()
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = [int(0.6 * len(order)), int(0.8 * len(order))]
    parts = np.split(order, cut)
    return {name: Split({"pixel_values": images[idx]}, labels[idx]) for name, idx in zip(SPLITS, parts)}


# ---------------------------------------------------------------- shapes (semantic segmentation)
SHAPE_CLASSES = ("background", "disc", "square", "triangle", "ring")
SHAPES_SIZE = 64
# Mean colour (RGB, in the images' -1..1 range) of each foreground class.
SHAPE_COLOURS = {
    1: np.array([0.9, -0.6, -0.6]),
    2: np.array([-0.6, 0.9, -0.6]),
    3: np.array([-0.6, -0.6, 0.9]),
    4: np.array([0.8, 0.8, -0.7]),
}


def _shape_mask(kind: int, yy, xx, cy, cx, r, rng) -> np.ndarray:
    if kind == 1:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == 2:
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    if kind == 3:  # upright triangle: apex at the top, base at the bottom
        top, bottom = cy - r, cy + r
        half = (yy - top) / (2 * r) * r
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return (d <= r) & (d >= 0.55 * r)


def shapes_images(count: int, seed: int, size: int = SHAPES_SIZE) -> Split:
    """`count` RGB images [count, 3, size, size] with 1-3 shapes each, and their per-pixel labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty([count, 3, size, size], dtype=np.float32)
    labels = np.zeros([count, size, size], dtype=np.int64)
    for i in range(count):
        # background: random stripes and noise, so that colour alone does not give the class away
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.1, 0.6)
        stripes = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
        base = rng.uniform(-0.5, 0.5, size=3)[:, None, None]
        images[i] = base + 0.35 * stripes[None] + 0.25 * rng.normal(size=(3, size, size))
        for _ in range(rng.integers(1, 4)):
            kind = int(rng.integers(1, len(SHAPE_CLASSES)))
            r = rng.uniform(0.12, 0.25) * size
            cy, cx = rng.uniform(r, size - r, size=2)
            mask = _shape_mask(kind, yy, xx, cy, cx, r, rng)
            colour = (SHAPE_COLOURS[kind] + rng.uniform(-0.35, 0.35, size=3))[:, None]
            images[i][:, mask] = colour + 0.15 * rng.normal(size=(3, int(mask.sum())))
            labels[i][mask] = kind
    return Split({"pixel_values": images}, labels)


SHAPES_SPLITS = {"train": 2000, "calibration": 200, "test": 200}


def shapes(seed: int = 0, splits: dict[str, int] | None = None) -> dict[str, Split]:
    """Train / calibration / test sets of the synthetic shapes, each from its own seed; `splits`
    chooses which and how many images (a split's first images do not depend on its size)."""
    splits = SHAPES_SPLITS if splits is None else splits
    return {name: shapes_images(count, seed * 1000 + SPLITS.index(name)) for name, count in splits.items()}


# ---------------------------------------------------------------- corpus (next-token prediction)
CONTEXT = 32


def corpus_text() -> str:
    """Python's documentation topics (shipped in the standard library), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


# The tokenizer learns its merges from the corpus' first characters: three times faster than from
# all of it, and the same merges matter (the corpus is one register of English and code).
TOKENIZER_CHARS = 150_000
CORPUS_SPECIAL = ("<pad>", "<s>", "</s>")


def corpus_tokenizer(vocab_size: int):
    """A byte-level BPE of `vocab_size` ids learnt from the corpus' first TOKENIZER_CHARS (deterministic)."""
    from aim.export.tokenizer import fast_tokenizer, train_bpe

    pad, bos, eos = CORPUS_SPECIAL
    serialised = train_bpe([corpus_text()[:TOKENIZER_CHARS]], vocab_size, CORPUS_SPECIAL)
    return fast_tokenizer(serialised, pad_token=pad, bos_token=bos, eos_token=eos)


def token_windows(ids: np.ndarray, context: int, count: int | None, seed: int) -> Split:
    """Windows of `context` tokens from `ids` and the token that follows each (the label)."""
    starts = np.arange(0, len(ids) - context - 1)
    if count is not None and count < len(starts):
        starts = np.sort(np.random.default_rng(seed).choice(starts, size=count, replace=False))
    windows = ids[starts[:, None] + np.arange(context)]
    return Split(
        {"input_ids": windows.astype(np.int64), "attention_mask": np.ones_like(windows, dtype=np.int64)},
        ids[starts + context].astype(np.int64),
    )


_ENCODED: dict[str, np.ndarray] = {}


def _encoded_corpus(tokenizer) -> np.ndarray:
    """The corpus' token ids, encoded once per distinct tokenizer (keyed by its serialised form)."""
    key = tokenizer.backend_tokenizer.to_str()
    if key not in _ENCODED:
        _ENCODED[key] = np.asarray(tokenizer(corpus_text())["input_ids"], dtype=np.int64)
    return _ENCODED[key]


def corpus(tokenizer, seed: int = 0, context: int = CONTEXT, sizes=(None, 1000, 2000)) -> dict[str, np.ndarray | Split]:
    """Token ids of the corpus split 90/5/5 by position (contiguous blocks: no overlap between
    splits); calibration and test as windows of `context` tokens with the next token as label."""
    ids = _encoded_corpus(tokenizer)
    cut = [int(0.9 * len(ids)), int(0.95 * len(ids))]
    train, calibration, test = np.split(ids, cut)
    return {
        "train": train,
        "calibration": token_windows(calibration, context, sizes[1], seed + 1),
        "test": token_windows(test, context, sizes[2], seed + 2),
    }
