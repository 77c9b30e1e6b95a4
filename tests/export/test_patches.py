"""The image ops rewritten for tracing (export/patches.py) equal PyTorch's own, also at sizes the
architecture matrix does not reach (pooling cells that do not divide the input, patches that leave a
border uncovered)."""

import pytest
import torch
import torch.nn.functional as F

from aim.export.patches import traceable_image_ops


@pytest.mark.parametrize("cells", [(1, 1), (2, 3), (3, 6), (6, 6), (None, 4), 5])
def test_adaptive_average_pooling_equals_pytorchs(cells):
    x = torch.randn(2, 3, 7, 10, generator=torch.Generator().manual_seed(0))
    expected, original = F.adaptive_avg_pool2d(x, cells), F.adaptive_avg_pool2d
    with traceable_image_ops():
        got = F.adaptive_avg_pool2d(x, cells)
        module = torch.nn.AdaptiveAvgPool2d(cells)(x)  # the module calls the patched function
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(module, expected, atol=1e-6, rtol=1e-6)
    assert F.adaptive_avg_pool2d is original  # restored


@pytest.mark.parametrize(
    ("size", "kernel", "stride"), [((8, 6), (2, 2), (2, 2)), ((7, 9), (2, 3), (2, 3)), ((7, 9), (2, 2), (1, 1))]
)
def test_fold_equals_pytorchs(size, kernel, stride):
    """Non-overlapping patches (rewritten; 7x9 leaves a border no patch covers) and overlapping ones (PyTorch's op)."""
    image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    patches = F.unfold(image, kernel_size=kernel, stride=stride)
    expected = F.fold(patches, output_size=size, kernel_size=kernel, stride=stride)
    original = F.fold
    with traceable_image_ops():
        assert F.fold is not original
        got = F.fold(patches, output_size=size, kernel_size=kernel, stride=stride)
    assert F.fold is original
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
