"""Debug drawing: crop rectangles and their agreement scores over the original image."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont, features

from engine.cropping import PixelBox

# Distinct, saturated colours (RGB) that stay readable on most photos; cycled when there are more regions.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (255, 225, 25),
)


def draw_regions(image: Image.Image, regions: Sequence[tuple[PixelBox, float]]) -> Image.Image:
    """An RGB copy of `image` with each box outlined and its score written at its top-left corner.

    The input is left untouched; line width and text size scale with the image's shorter side.
    """
    canvas = image.convert("RGB")  # always a copy; RGB so the palette shows on grey or palette images
    draw = ImageDraw.Draw(canvas)
    short_side = min(canvas.size)
    line_width = max(1, round(short_side / 250))
    font = _default_font(size=max(10, round(short_side / 40)))
    for index, (box, score) in enumerate(regions):
        colour = PALETTE[index % len(PALETTE)]
        # PixelBox is half-open; PIL's rectangle includes both corners.
        corners = (box.x1, box.y1, max(box.x1, box.x2 - 1), max(box.y1, box.y2 - 1))
        draw.rectangle(corners, outline=colour, width=line_width)
        text = f"{score:.2f}"
        left, top, right, bottom = draw.textbbox((box.x1, box.y1), text, font=font)
        draw.rectangle((left, top, right, bottom), fill=colour)  # label background for legibility
        draw.text((box.x1, box.y1), text, fill=(0, 0, 0), font=font)
    return canvas


def _default_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # A sized default font needs FreeType; a Pillow built without it only has the small bitmap font.
    return ImageFont.load_default(size=size) if features.check("freetype2") else ImageFont.load_default()
