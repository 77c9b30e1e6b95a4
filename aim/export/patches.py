"""Rewrites active while torch.onnx traces an image model, for two ops its TorchScript exporter cannot
export as transformers uses them; Optimum's model patcher has no rewrite for either (nor an ONNX config
for the architectures that need them: UperNet, BEiT and Data2Vec segmentation, MobileViTV2), so they are
hand-written here, each exactly equal to the op it replaces.

- adaptive_avg_pool2d to n > 1 cells (UperNet's pyramid pooling): the exporter takes only output sizes
  that divide a statically known input size. Here it is two matmuls with averaging matrices built for
  the input size seen while tracing, so the graph is right for that size only: the architectures that
  need it take one input size (families/architectures.py, FIXED_IMAGE_SIZE), and a size-dynamic model
  would fail its verification, which runs at another size than the trace. Global pooling (1 cell) keeps
  the original op (GlobalAveragePool, any size).
- fold (col2im) of non-overlapping patches (MobileViTV2): the exporter needs a static output size. A
  fold whose stride is its kernel is a reshape and a transpose, for any size.
"""

from __future__ import annotations

import contextlib


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _averaging(size: int, cells: int):
    """[cells, size]: row i averages input[floor(i*size/cells) : ceil((i+1)*size/cells)], PyTorch's bins."""
    import torch

    matrix = torch.zeros(cells, size)
    for i in range(cells):
        start, end = (i * size) // cells, -((-(i + 1) * size) // cells)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


@contextlib.contextmanager
def traceable_image_ops():
    import torch.nn.functional as F

    pool, fold = F.adaptive_avg_pool2d, F.fold

    def adaptive_avg_pool2d(input, output_size):
        height, width = (int(d) for d in input.shape[-2:])
        cells = tuple(size if cell is None else cell for cell, size in zip(_pair(output_size), (height, width)))
        if cells == (1, 1):
            return pool(input, output_size)
        rows, columns = _averaging(height, cells[0]).to(input.dtype), _averaging(width, cells[1]).to(input.dtype)
        return rows @ input @ columns.T

    def fold_patches(input, output_size, kernel_size, dilation=1, padding=0, stride=1):
        kernel = _pair(kernel_size)
        if _pair(stride) != kernel or _pair(dilation) != (1, 1) or _pair(padding) != (0, 0) or input.dim() != 3:
            return fold(input, output_size, kernel_size, dilation, padding, stride)
        height, width = output_size
        batch, rows, columns = input.shape[0], height // kernel[0], width // kernel[1]
        patches = input.reshape(batch, -1, kernel[0], kernel[1], rows, columns)
        image = patches.permute(0, 1, 4, 2, 5, 3).reshape(batch, -1, rows * kernel[0], columns * kernel[1])
        return F.pad(
            image, (0, width - columns * kernel[1], 0, height - rows * kernel[0])
        )  # fold leaves what no patch covers 0

    F.adaptive_avg_pool2d, F.fold = adaptive_avg_pool2d, fold_patches
    try:
        yield
    finally:
        F.adaptive_avg_pool2d, F.fold = pool, fold
