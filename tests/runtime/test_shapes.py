"""Shape flags in trtexec's spelling -> dims' ranges and a TensorRT profile."""

import pytest

from aim.layout import Tensor
from aim.runtime.shapes import ShapeError, ShapeRanges, parse_shapes
from aim.specs import DimRange

MODULATED = [
    Tensor("image", "float32", ["n", 3, "h", "w"]),
    Tensor("utility", "float32", ["n"]),
    Tensor("focus", "float32", ["n", 10]),
]


def test_parse_like_trtexec():
    assert parse_shapes("image:1x3x224x224,mask:1x224") == {"image": [1, 3, 224, 224], "mask": [1, 224]}
    assert parse_shapes("ns:x:2x4") == {"ns:x": [2, 4]}  # the dims follow the last colon
    for bad in ("image=1x3", "image:1x", ":1x3", "image:1,image:2"):
        with pytest.raises(ShapeError, match="--opt-shapes"):
            parse_shapes(bad)


def test_bounds_fill_in_and_follow_dim_names():
    ranges = ShapeRanges.parse("image:1x3x32x32", None, "image:16x3x64x64")  # opt defaults to max
    assert ranges.dims(MODULATED) == {"n": DimRange(1, 16, 16), "h": DimRange(32, 64, 64), "w": DimRange(32, 64, 64)}
    profile = ranges.profile(MODULATED)
    assert profile["utility"] == {"min": [1], "opt": [16], "max": [16]}  # follows n, though no flag names it
    assert profile["focus"] == {"min": [1, 10], "opt": [16, 10], "max": [16, 10]}
    fixed = ShapeRanges.parse(None, "image:4x3x8x8")  # one bound alone fixes the shape
    assert fixed.profile(MODULATED)["image"] == {"min": [4, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [4, 3, 8, 8]}
    assert fixed.flags() == {"min": "image:4x3x8x8", "opt": "image:4x3x8x8", "max": "image:4x3x8x8"}


@pytest.mark.parametrize(
    "flags, message",
    [
        ((None, None, None), "input 'image' axis 0 has dynamic dim 'n', which has no range"),
        (("image:1x3x8x8", None, "image:4x3x8"), "shapes of different ranks"),
        (("image:8x3x8x8", None, "image:4x3x8x8"), "need min <= opt <= max"),
        (("image:1x4x8x8",), "axis 1 is 3 in the graph"),
        (("image:1x3x8",), "has rank 4"),
        ((None, None, "image:4x3x8x8,focus:2x10"), "dim 'n' is shared by inputs 'image' and 'focus'"),
        ((None, None, "pixels:1x3"), "not an input of the graph"),
    ],
)
def test_flags_that_contradict_the_graph(flags, message):
    with pytest.raises(ShapeError, match=message):
        ShapeRanges.parse(*flags).profile(MODULATED)


def test_an_unnamed_dim_needs_its_input_named():
    inputs = [Tensor("x", "float32", ["n", None]), Tensor("utility", "float32", ["n"])]
    with pytest.raises(ShapeError, match="input 'x' axis 1 has a dynamic dim without a name"):
        ShapeRanges.parse(None, None, "utility:4").profile(inputs)
    assert ShapeRanges.parse(None, None, "x:4x7").profile(inputs)["x"]["max"] == [4, 7]
