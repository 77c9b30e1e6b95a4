"""Blocks of the class axis that the redistribution's noisy branch works through one at a time, where the
logits are maps (docs/results.md, "SegFormer's peak RSS").

A segmentation map's logits are large (SegFormer at 512 x 512: 150 classes x 262,144 pixels, 150 MiB per
image), and ONNX Runtime runs no two-input element-wise op (Add, Mul) in place: z + u * n over the whole
tensor holds the logits, the noise and the sum at once, and each step of Box-Muller another full-size
tensor. Block by block, only a block's worth of them is alive at a time, and the sum's blocks are
concatenated into the output.

The blocks follow Box-Muller's pairs: the noise of pair p is r cos(theta) for class p and r sin(theta) for
class half + p (half = ceil(C / 2)), so one tile of pairs [p0, p1) fills two blocks, classes [p0, p1) and
[half + p0, half + p1) (cut at C). Keyed noise keeps exactly the values it draws over the whole tensor.
"""

from __future__ import annotations

import math

# Logits with at least this many axes beside the batch and the classes (height and width) are tiled.
MAP_AXES = 2
# About this many tiles of pairs (twice as many blocks): SegFormer's 150 classes give 15 tiles of 5 pairs,
# blocks of 5 classes (5 MiB per image at 512 x 512). Fewer, larger tiles hold more at once; more tiles
# add nodes (a block's focus scatter is ~10 small ones) that cost time whatever the map's size.
TILES = 16


class ClassTiles:
    """Tiles of Box-Muller pairs over C classes and the blocks of classes they fill."""

    def __init__(self, classes: int, pairs_per_tile: int):
        self.classes, self.half = classes, (classes + 1) // 2
        self.pairs = [(p, min(p + pairs_per_tile, self.half)) for p in range(0, self.half, pairs_per_tile)]

    def blocks(self) -> list[tuple[int, int]]:
        """The class ranges [start, stop), in pair order (tile 0's cosine block, its sine block, tile 1's,
        ...): the order the branch works in. A sine block past the last class is left out."""
        spans = []
        for p0, p1 in self.pairs:
            spans.append((p0, p1))
            if self.half + p0 < self.classes:
                spans.append((self.half + p0, min(self.half + p1, self.classes)))
        return spans

    def in_class_order(self, items: list) -> list:
        """`items` (one per block, in blocks()' order) sorted by their blocks' first class."""
        starts = [start for start, _ in self.blocks()]
        return [item for _, item in sorted(zip(starts, items), key=lambda pair: pair[0])]

    def __len__(self) -> int:
        return len(self.pairs)


def class_tiles(rank: int, classes: int) -> ClassTiles | None:
    """The tiles for logits of this rank and class count, or None where the branch works on the whole
    tensor (rows [B, C], sequences [B, T, V], and maps of two classes or fewer: one tile)."""
    if rank - 2 < MAP_AXES:
        return None
    tiles = ClassTiles(classes, math.ceil((classes + 1) // 2 / TILES))
    return tiles if len(tiles) > 1 else None
