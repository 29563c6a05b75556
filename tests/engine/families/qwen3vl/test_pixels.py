"""Qwen3-VL pixels: the grid an image is resized to, and prepare_qwen_image against transformers' processor."""

from __future__ import annotations

import numpy as np
import pytest

from engine.families.qwen3vl.pixels import fit_to_grid, prepare_qwen_image
from tests.support import structured_image

# ---------------------------------------------------------------------------------------------- fit_to_grid


def test_fit_to_grid_examples() -> None:
    assert fit_to_grid(640, 480, 512) == (512, 384)  # longest side hits the resolution
    assert fit_to_grid(4000, 3000, 512) == (512, 384)
    assert fit_to_grid(640, 480, None) == (640, 480)  # None: native size
    assert fit_to_grid(300, 900, None) == (288, 896)  # native, rounded to the nearest multiple of 32
    assert fit_to_grid(300, 900, 4096) == (288, 896)  # never upscaled to the resolution
    assert fit_to_grid(20, 10, None) == (32, 32)  # tiny: one grid cell, the only upscale
    assert fit_to_grid(1, 1, 256) == (32, 32)
    assert fit_to_grid(2000, 1500, None, max_pixels=1_000_000) == (1152, 864)  # area cap, floored
    assert fit_to_grid(640, 480, 448, factor=28) == (448, 336)


def test_fit_to_grid_properties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        width, height = (int(v) for v in rng.integers(1, 9000, size=2))
        factor = int(rng.choice([28, 32]))
        resolution = None if rng.random() < 0.2 else factor * int(rng.integers(1, 80))
        max_pixels = int(rng.choice([16_777_216, 1_000_000, 200_000]))
        out_w, out_h = fit_to_grid(width, height, resolution, factor=factor, max_pixels=max_pixels)

        assert out_w % factor == 0 and out_h % factor == 0 and out_w >= factor and out_h >= factor
        assert out_w * out_h <= max_pixels
        longest = max(width, height)
        scale = 1.0 if resolution is None else min(1.0, resolution / longest)
        # Never upscaled, except rounding to the nearest multiple (<= factor/2) or up to one cell.
        assert out_w <= max(factor, width * scale + factor / 2)
        assert out_h <= max(factor, height * scale + factor / 2)
        if resolution is not None and longest > resolution and resolution * resolution <= max_pixels // 2:
            assert max(out_w, out_h) == resolution


def test_fit_to_grid_extreme_aspect_stays_under_max_pixels() -> None:
    assert fit_to_grid(10, 100_000, None, max_pixels=32 * 32 * 10) == (32, 320)
    assert fit_to_grid(100_000, 10, None, max_pixels=32 * 32 * 10) == (320, 32)


# ---------------------------------------------------------------- prepare_qwen_image vs Qwen2VLImageProcessor

# (width, height, resolution, max_pixels)
HF_CASES = [
    (640, 480, 512, 16_777_216),  # landscape, shrunk to 512x384
    (300, 900, None, 16_777_216),  # portrait, native size rounded to 288x896
    (20, 10, None, 16_777_216),  # tiny: one 32x32 cell
    (33, 47, 640, 16_777_216),  # tiny, resolution above native: 32x32, not upscaled
    (512, 512, None, 16_777_216),  # square, untouched
    (512, 512, 256, 16_777_216),  # square, halved
    (1000, 700, None, 16_777_216),  # native, both sides rounded (992x704)
    (4000, 3000, 512, 16_777_216),  # very large, strong antialiased shrink
    (2000, 1500, None, 1_000_000),  # max_pixels cap (1152x864)
]


@pytest.fixture(scope="module")
def transformers_module():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()  # silence the "falling back to the PIL backend" notice
    return transformers


@pytest.mark.parametrize(("width", "height", "resolution", "max_pixels"), HF_CASES)
def test_prepare_qwen_image_matches_transformers(
    transformers_module, width: int, height: int, resolution: int | None, max_pixels: int
) -> None:
    image = structured_image(width, height, seed=width * 7919 + height)
    ours = prepare_qwen_image(image, resolution, max_pixels=max_pixels)

    # HF resizes the ORIGINAL image itself (smart_resize + PIL bicubic), so our resize is compared too.
    # shortest_edge=1 switches off its min_pixels upscale. Its longest_edge is a pixel area: at native
    # resolution it is the same cap we use; with a resolution it is our target area, from which
    # smart_resize derives the same sides for these aspect ratios (grid_thw equality checks that).
    hf_area = max_pixels if resolution is None else ours.size[0] * ours.size[1]
    processor = transformers_module.Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 1, "longest_edge": hf_area},
    )
    reference = processor(images=image, return_tensors="np")

    assert ours.grid_thw == tuple(reference["image_grid_thw"][0].tolist())
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(ours.pixel_values, reference["pixel_values"])
    t, h, w = ours.grid_thw
    assert ours.size == (w * 16, h * 16)
    assert ours.n_tokens == t * h * w // 4


def test_prepare_qwen_image_token_counts() -> None:
    assert prepare_qwen_image(structured_image(256, 256, 1), None).n_tokens == 64
    assert prepare_qwen_image(structured_image(1024, 1024, 2), 512).n_tokens == 256
