"""Molmo2Family: the family hooks the pipeline calls."""

from engine.boxes import Box
from engine.families.molmo2 import Molmo2Family
from runtimes.protocol import ImageConfig


def test_parse_grounding_turns_a_point_into_the_default_square() -> None:
    family = Molmo2Family(ImageConfig(patch_size=14, crop_size=378, overlap_margins=(4, 4), max_crops=8))
    grounding = family.parse_grounding('<points coords="1 1 500 500">cat</points>')
    assert grounding.boxes == (Box(0.45, 0.45, 0.55, 0.55, "cat"),)
