import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.boxes import Box, boxes_to_array, pairwise_iou

unit = st.floats(0.0, 1.0)


@st.composite
def boxes(draw):
    return Box.from_corners(draw(unit), draw(unit), draw(unit), draw(unit))


def test_box_keeps_exact_values_and_coerces_ints():
    assert Box(0.1, 0.2, 0.3, 0.4, "cat").as_list() == [0.1, 0.2, 0.3, 0.4]
    box = Box(0, 0, 1, 1)
    assert box == Box(0.0, 0.0, 1.0, 1.0)
    assert isinstance(box.x2, float)


INVALID_CORNERS = [
    (0.5, 0.0, 0.4, 1.0),
    (0.0, 0.5, 1.0, 0.4),
    (-0.1, 0, 0.5, 0.5),
    (0, 0, 1.1, 0.5),
    (math.nan, 0, 1, 1),
]


@pytest.mark.parametrize("corners", INVALID_CORNERS)
def test_box_rejects_invalid_corners(corners):
    with pytest.raises(ValueError):
        Box(*corners)


def test_box_is_frozen():
    with pytest.raises(AttributeError):
        Box(0, 0, 1, 1).x1 = 0.5


def test_from_corners_orders_and_clips():
    assert Box.from_corners(0.6, 0.9, 0.2, 0.1, "x") == Box(0.2, 0.1, 0.6, 0.9, "x")
    assert Box.from_corners(-0.5, 0.2, 1.5, math.inf) == Box(0.0, 0.2, 1.0, 1.0)
    with pytest.raises(ValueError):
        Box.from_corners(math.nan, 0, 1, 1)


def test_measures():
    box = Box(0.1, 0.2, 0.5, 0.4)
    assert box.width == pytest.approx(0.4)
    assert box.height == pytest.approx(0.2)
    assert box.area == pytest.approx(0.08)
    assert box.center == pytest.approx((0.3, 0.3))


def test_iou():
    a = Box(0.0, 0.0, 0.5, 0.5)
    assert a.iou(a) == 1.0
    assert a.iou(Box(0.5, 0.5, 1.0, 1.0)) == 0.0
    assert a.iou(Box(0.25, 0.0, 0.75, 0.5)) == pytest.approx(1 / 3)
    assert Box(0.2, 0.2, 0.2, 0.2).iou(Box(0.2, 0.2, 0.2, 0.2)) == 0.0  # empty boxes do not divide by zero


def test_boxes_to_array_shape_for_empty_input():
    assert boxes_to_array([]).shape == (0, 4)


@settings(max_examples=100, deadline=None)
@given(st.lists(boxes(), max_size=5), st.lists(boxes(), max_size=5))
def test_pairwise_iou_matches_box_iou(a, b):
    matrix = pairwise_iou(a, b)
    assert matrix.shape == (len(a), len(b))
    expected = np.array([[x.iou(y) for y in b] for x in a]).reshape(len(a), len(b))
    np.testing.assert_allclose(matrix, expected, atol=1e-12)
    assert ((matrix >= 0) & (matrix <= 1 + 1e-12)).all()
