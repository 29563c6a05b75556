"""train/cells.py: an object's box onto an image's token grid, through the region the image shows."""

from __future__ import annotations

import numpy as np

from train.cells import coverage, token_centres


def test_a_box_on_one_token_covers_it_alone() -> None:
    covered = coverage((4, 4), (0, 0, 400, 400), (100, 200, 200, 300)).reshape(4, 4)
    expected = np.zeros((4, 4))
    expected[2, 1] = 1.0
    np.testing.assert_allclose(covered, expected)


def test_partial_cover_is_the_fraction_of_the_token_area() -> None:
    covered = coverage((2, 4), (0, 0, 400, 200), (50, 0, 150, 50)).reshape(2, 4)
    np.testing.assert_allclose(covered, [[0.25, 0.25, 0, 0], [0, 0, 0, 0]])


def test_a_crop_maps_the_box_through_its_region() -> None:
    """A crop of the scene's [1000, 2000) x [500, 1500) square: a box at its centre covers its middle tokens."""
    covered = coverage((2, 2), (1000, 500, 2000, 1500), (1400, 900, 1600, 1100)).reshape(2, 2)
    np.testing.assert_allclose(covered, np.full((2, 2), 0.04))
    assert coverage((2, 2), (1000, 500, 2000, 1500), (0, 0, 900, 400)).sum() == 0  # outside the crop


def test_token_centres_are_row_major_fractions() -> None:
    centres = token_centres((2, 4))
    np.testing.assert_allclose(centres[:4, 0], [0.125, 0.375, 0.625, 0.875])
    np.testing.assert_allclose(centres[:, 1], [0.25] * 4 + [0.75] * 4)
