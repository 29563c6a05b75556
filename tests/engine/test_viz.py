import numpy as np
from PIL import Image

from engine.cropping import PixelBox
from engine.viz import PALETTE, draw_regions


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)  # (H, W, 3)


def test_draws_on_a_copy_of_the_same_size_only_where_boxes_are():
    image = Image.new("RGB", (400, 300), (128, 128, 128))
    box = PixelBox(100, 80, 300, 220)
    drawn = draw_regions(image, [(box, 0.75)])

    assert drawn.size == image.size
    assert drawn is not image
    assert (pixels(image) == 128).all()  # input untouched
    changed = (pixels(drawn) != pixels(image)).any(axis=2)  # (H, W)
    assert changed[box.y2 - 1, (box.x1 + box.x2) // 2]  # bottom edge
    assert changed[(box.y1 + box.y2) // 2, box.x1]  # left edge
    assert not changed[box.y1 + 80, box.x1 + 100]  # interior, away from the score text
    assert not changed[:, : box.x1 - 5].any() and not changed[box.y2 + 5 :, :].any()


def test_score_text_is_written_at_the_corner():
    image = Image.new("RGB", (400, 300), (128, 128, 128))
    box = PixelBox(100, 80, 300, 220)
    drawn = pixels(draw_regions(image, [(box, 0.5)]))
    # The label background fills a block inside the top-left corner, beyond the outline's width.
    assert (drawn[box.y1 + 5, box.x1 + 5] != 128).any()


def test_regions_get_distinct_colours():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    regions = [(PixelBox(10, 10, 90, 90), 1.0), (PixelBox(110, 10, 190, 90), 0.5)]
    drawn = draw_regions(image, regions)
    assert drawn.getpixel((50, 89)) == PALETTE[0]
    assert drawn.getpixel((150, 89)) == PALETTE[1]


def test_no_regions_gives_an_equal_copy():
    image = Image.new("RGB", (32, 16), (1, 2, 3))
    drawn = draw_regions(image, [])
    assert drawn is not image
    assert (pixels(drawn) == pixels(image)).all()


def test_grey_and_tiny_images():
    grey = Image.new("L", (50, 40), 0)
    drawn = draw_regions(grey, [(PixelBox(0, 0, 50, 40), 0.3), (PixelBox(10, 10, 11, 11), 1.0)])
    assert drawn.mode == "RGB" and drawn.size == (50, 40)
    assert (pixels(drawn) != 0).any()
