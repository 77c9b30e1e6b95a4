"""How each task is trained and evaluated (evaluation/task_evaluation.py), apart from how it is traced."""

from __future__ import annotations

import numpy as np
import pytest

from aim.errors import UnknownModelError
from aim.evaluation.task_evaluation import EVALUATIONS, evaluation_of, whitespace
from aim.families import get_family, list_families
from aim.tasks import TASKS


def test_every_task_of_a_family_has_its_evaluation_and_no_other_exists():
    """`make train` / `make eval` of any family finds its task's data; every evaluation is of a task that exists."""
    assert {get_family(name).task for name in list_families()} <= set(EVALUATIONS) <= set(TASKS)
    with pytest.raises(UnknownModelError, match="no training or evaluation data for the task 'painting'"):
        evaluation_of("painting")


class _Engine:
    inputs = {"pixel_values": (np.float32, ["batch", 3, "height", "width"])}


def test_image_variants_move_every_pixel_by_one_8_bit_level():
    """The attack's imperceptible variants: each pixel +-1/255 of the -1..1 range (2/255), both signs drawn."""
    image = np.zeros((2, 3, 8, 8), np.float32)
    for task in ("image-classification", "semantic-segmentation"):
        variants = list(evaluation_of(task).variants(_Engine(), {"pixel_values": image}, 3, checkpoint=None))
        assert len(variants) == 3
        for variant in variants:
            moved = variant["pixel_values"] - image
            np.testing.assert_allclose(np.abs(moved), 2 / 255, rtol=1e-6)
            assert 0.3 < np.mean(moved > 0) < 0.7
        assert not np.array_equal(variants[0]["pixel_values"], variants[1]["pixel_values"])


def test_text_variants_are_the_shortest_whitespace_prefixes_first():
    assert whitespace(4) == [" ", "\n", "\t", "  "]
    assert len(set(whitespace(39))) == 39 and max(map(len, whitespace(39))) == 3  # 3 + 9 + 27
