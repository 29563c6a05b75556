import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.boxes import Box
from engine.cropping import PixelBox, crop_image, plan_crops, to_pixels


def test_pixel_box_measures():
    box = PixelBox(10, 20, 110, 70)
    assert (box.width, box.height, box.area) == (100, 50, 5000)
    assert box.as_list() == [10, 20, 110, 70]


def test_to_pixels_is_exact_on_integer_boundaries():
    assert to_pixels(Box(0.1, 0.2, 0.3, 0.4), 1000, 500) == PixelBox(100, 100, 300, 200)
    assert to_pixels(Box(0.7, 0.0, 0.9, 0.07), 1000, 100) == PixelBox(700, 0, 900, 7)  # 0.07 * 100 != 7.0


def test_to_pixels_rounds_outward_and_is_never_empty():
    assert to_pixels(Box(0.101, 0.0, 0.299, 1.0), 100, 10) == PixelBox(10, 0, 30, 10)
    assert to_pixels(Box(1.0, 1.0, 1.0, 1.0), 640, 480) == PixelBox(639, 479, 640, 480)


def test_padding_is_a_fraction_of_the_box_on_each_side():
    # 200 x 100 px box; 15 % padding adds 30 px left and right, 15 px top and bottom.
    (crop,) = plan_crops([Box(0.4, 0.4, 0.6, 0.5)], 1000, 1000)
    assert crop == PixelBox(370, 385, 630, 515)
    (unpadded,) = plan_crops([Box(0.4, 0.4, 0.6, 0.5)], 1000, 1000, padding=0.0)
    assert unpadded == PixelBox(400, 400, 600, 500)


def test_min_side_grows_around_the_centre():
    (crop,) = plan_crops([Box(0.5, 0.5, 0.51, 0.52)], 1000, 1000, padding=0.0, min_side=100)
    assert crop == PixelBox(455, 460, 555, 560)


def test_crop_at_the_edge_is_shifted_not_shrunk():
    (crop,) = plan_crops([Box(0.0, 0.95, 0.02, 1.0)], 1000, 1000, padding=0.0, min_side=200)
    assert crop == PixelBox(0, 800, 200, 1000)


def test_min_side_is_capped_at_the_image_side():
    (crop,) = plan_crops([Box(0.4, 0.4, 0.6, 0.6)], 50, 300, padding=0.0, min_side=100)
    assert crop == PixelBox(0, 100, 50, 200)


def test_padding_past_the_image_is_clamped():
    (crop,) = plan_crops([Box(0.0, 0.0, 1.0, 1.0)], 640, 480, padding=0.5)
    assert crop == PixelBox(0, 0, 640, 480)


def test_near_duplicates_merge_into_their_union():
    crops = plan_crops([Box(0.1, 0.1, 0.5, 0.5), Box(0.11, 0.1, 0.51, 0.5)], 100, 100, padding=0.0)
    assert crops == [PixelBox(10, 10, 51, 50)]


def test_nested_crops_merge():
    crops = plan_crops([Box(0.4, 0.4, 0.5, 0.5), Box(0.1, 0.1, 0.9, 0.9)], 100, 100, padding=0.0)
    assert crops == [PixelBox(10, 10, 90, 90)]


def test_merging_repeats_until_stable():
    # a and c do not overlap enough, but once a and b merge their union contains c.
    a, b, c = Box(0.0, 0.0, 0.5, 0.5), Box(0.05, 0.0, 0.55, 0.5), Box(0.3, 0.1, 0.55, 0.4)
    crops = plan_crops([a, c, b], 100, 100, padding=0.0, merge_iou=0.8)
    assert crops == [PixelBox(0, 0, 55, 50)]


def test_distinct_crops_are_kept_in_priority_order_and_capped():
    boxes = [Box(0.6, 0.6, 0.9, 0.9), Box(0.0, 0.0, 0.2, 0.2), Box(0.0, 0.7, 0.2, 0.9)]
    crops = plan_crops(boxes, 100, 100, padding=0.0)
    assert crops == [PixelBox(60, 60, 90, 90), PixelBox(0, 0, 20, 20), PixelBox(0, 70, 20, 90)]
    assert plan_crops(boxes, 100, 100, padding=0.0, max_crops=2) == crops[:2]
    assert plan_crops(boxes, 100, 100, max_crops=0) == []
    assert plan_crops([], 100, 100) == []


@pytest.mark.parametrize("kwargs", [{"padding": -0.1}, {"min_side": -1}, {"max_crops": -1}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        plan_crops([Box(0, 0, 1, 1)], 10, 10, **kwargs)


def test_invalid_image_size():
    with pytest.raises(ValueError):
        plan_crops([Box(0, 0, 1, 1)], 0, 10)


def test_crop_image():
    image = Image.new("RGB", (64, 48))
    image.putpixel((10, 20), (255, 0, 0))
    piece = crop_image(image, PixelBox(10, 20, 30, 25))
    assert piece.size == (20, 5)
    assert piece.getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ValueError):
        crop_image(image, PixelBox(50, 0, 70, 10))


unit = st.floats(0.0, 1.0)
random_boxes = st.builds(Box.from_corners, unit, unit, unit, unit)


@settings(max_examples=300, deadline=None)
@given(
    boxes=st.lists(random_boxes, max_size=6),
    width=st.integers(1, 2000),
    height=st.integers(1, 2000),
    padding=st.floats(0.0, 1.0),
    min_side=st.integers(0, 1200),
    merge_iou=st.floats(0.1, 1.0),
)
def test_fuzz_crops_are_inside_large_enough_distinct_and_cover_every_box(
    boxes, width, height, padding, min_side, merge_iou
):
    crops = plan_crops(boxes, width, height, padding=padding, min_side=min_side, merge_iou=merge_iou)
    assert len(crops) <= len(boxes)
    for crop in crops:
        assert all(isinstance(v, int) for v in crop.as_list())
        assert 0 <= crop.x1 < crop.x2 <= width and 0 <= crop.y1 < crop.y2 <= height
        assert crop.width >= min(max(min_side, 1), width)
        assert crop.height >= min(max(min_side, 1), height)
    for i, a in enumerate(crops):
        for b in crops[i + 1 :]:
            assert a.iou(b) < merge_iou and not a.contains(b) and not b.contains(a)
    for box in boxes:
        assert any(crop.contains(to_pixels(box, width, height)) for crop in crops)


def test_min_fraction_scales_the_minimum_with_the_image():
    box = [Box(0.5, 0.5, 0.51, 0.51)]
    (small,) = plan_crops(box, 1000, 500, padding=0.0, min_side=50, min_fraction=0.1)
    (large,) = plan_crops(box, 4000, 2000, padding=0.0, min_side=50, min_fraction=0.1)
    assert (small.width, small.height) == (100, 100)  # a tenth of the longest side, not min_side
    assert (large.width, large.height) == (400, 400)
    (pixels,) = plan_crops(box, 1000, 500, padding=0.0, min_side=150, min_fraction=0.1)
    assert pixels.width == 150  # the larger of the two minimums
