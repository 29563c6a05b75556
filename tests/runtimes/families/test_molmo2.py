"""Molmo2 image token layout against transformers' Molmo2Processor.replace_image_token, every switch."""

import itertools

import pytest
from transformers.models.molmo2.processing_molmo2 import Molmo2Processor

from runtimes.families.molmo2 import Layout, image_tokens, n_image_tokens


class _Switches:
    def __init__(self, col, single_col, single_start):
        self.image_use_col_tokens = col
        self.use_single_crop_col_tokens = single_col
        self.use_single_crop_start_token = single_start


@pytest.mark.parametrize(
    "switches", list(itertools.product([True, False], [None, True, False], [True, False])), ids=str
)
@pytest.mark.parametrize("grid", [[14, 14, 14, 14], [14, 14, 23, 33], [14, 14, 14, 42]], ids=str)
def test_layout_equals_the_processor_for_every_switch(switches, grid):
    col, single_col, single_start = switches
    expected = Molmo2Processor.replace_image_token(_Switches(*switches), {"image_grids": [grid]}, 0)
    config = {
        "image_use_col_tokens": col,
        "use_single_crop_col_tokens": single_col,
        "use_single_crop_start_token": single_start,
    }
    layout = Layout.from_processor_config(config)
    assert "".join(image_tokens(grid, layout)) == expected
    assert n_image_tokens(grid, layout) == len(image_tokens(grid, layout))


def test_missing_switches_mean_the_processor_defaults():
    assert Layout.from_processor_config({}) == Layout()
