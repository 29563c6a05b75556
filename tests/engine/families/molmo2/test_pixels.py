"""Molmo2 numpy preprocessing against transformers' Molmo2ImageProcessor.

Three layers of proof, strongest first:
  1. the real processor (needs torchvision; skipped here, run on the GPU machine where it is installed);
  2. the processor's own code (`_image_batch_to_patches_and_grids`, select_tiling, arange_for_pooling, the
     unfold into crops), run with a torch-only stand-in for its two torchvision calls (resize, normalize);
  3. fixed values checked in below, computed by the processor's own code in transformers 5.23 (layer 2)
     and by hand from its rules: crop grids, token counts, pooling shapes and hashes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.families.molmo2.pixels import (
    CropScheme,
    molmo2_crop_budget,
    molmo2_geometry,
    molmo2_pooling,
    prepare_molmo2_image,
    resize_bilinear_uint8,
    select_tiling,
)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x * 7 + y * 3) % 256], -1)
    noisy = base + rng.integers(0, 60, base.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


class _TorchOnlyBackend:
    """Stands in for TorchvisionBackend in Molmo2ImageProcessor's own batch code.

    Only torchvision's two functions are replaced: tvF.resize of a float tensor with bilinear,
    antialias=False is torch.nn.functional.interpolate(align_corners=False), and tvF.normalize is
    (x - mean) / std. The fusing of rescale into mean and std is transformers' own method.
    """

    from transformers.image_processing_backends import TorchvisionBackend as _B
    from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor as _P

    _build_overlapping_crops = _P._build_overlapping_crops
    _image_batch_to_patches_and_grids = _P._image_batch_to_patches_and_grids
    _fuse_mean_std_and_rescale_factor = _B._fuse_mean_std_and_rescale_factor

    def resize(self, image, size, resample=None, antialias=True):
        return F.interpolate(image, size=(size.height, size.width), mode="bilinear", align_corners=False)

    def rescale_and_normalize(self, images, do_rescale, rescale_factor, do_normalize, image_mean, image_std):
        mean, std, _ = self._fuse_mean_std_and_rescale_factor(
            do_normalize, image_mean, image_std, do_rescale, rescale_factor, images.device
        )
        return (images.to(torch.float32) - mean[:, None, None]) / std[:, None, None]


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def hf_code_reference(image: Image.Image, max_crops: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """transformers' Molmo2 batch code on one image: (pixel_values, pooling, grid)."""
    chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].contiguous()
    grid, patches, pooling = _TorchOnlyBackend()._image_batch_to_patches_and_grids(
        chw,
        max_crops=max_crops,
        overlap_margins=[4, 4],
        crop_size=378,
        resample=None,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        image_patch_size=14,
        image_pooling_w=2,
        image_pooling_h=2,
    )
    return patches[0].numpy(), pooling[0].numpy(), grid[0].numpy()


SIZES = [(640, 480), (300, 200), (1000, 250), (90, 700), (378, 378), (1200, 1180)]


@pytest.mark.parametrize(("width", "height"), SIZES)
@pytest.mark.parametrize("max_crops", [1, 4, 8])
def test_equals_the_hf_processor_code(width, height, max_crops):
    image = picture(width, height, seed=width + height)
    expected_pixels, expected_pooling, expected_grid = hf_code_reference(image, max_crops)
    got = prepare_molmo2_image(image, scheme=CropScheme(max_crops=max_crops))
    np.testing.assert_array_equal(got.geometry.image_grid, expected_grid)
    np.testing.assert_array_equal(got.image_token_pooling, expected_pooling)
    assert got.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(got.pixel_values, expected_pixels)


def test_equals_the_hf_processor_code_with_clip_normalization():
    # Some Molmo2 checkpoints are said to ship OpenAI-CLIP mean/std: the family reads them from the config.
    image = picture(500, 333, seed=9)
    expected_pixels, _, _ = hf_code_reference(image, 4, CLIP_MEAN, CLIP_STD)
    got = prepare_molmo2_image(image, scheme=CropScheme(max_crops=4), mean=CLIP_MEAN, std=CLIP_STD)
    np.testing.assert_array_equal(got.pixel_values, expected_pixels)


def test_equals_the_real_hf_processor_where_torchvision_runs():
    try:
        import torchvision  # noqa: F401
        from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

        processor = Molmo2ImageProcessor()
    except Exception as error:  # ImportError, or torchvision present but broken against this torch
        pytest.skip(f"the real Molmo2ImageProcessor needs a working torchvision ({type(error).__name__})")
    for (width, height), max_crops in zip(SIZES, [8, 4, 8, 2, 1, 8]):
        image = picture(width, height, seed=3)
        out = processor(image, max_crops=max_crops, return_tensors="np")
        got = prepare_molmo2_image(image, scheme=CropScheme(max_crops=max_crops))
        np.testing.assert_array_equal(out["image_grids"][0], got.geometry.image_grid)
        np.testing.assert_array_equal(out["image_token_pooling"], got.image_token_pooling)
        np.testing.assert_array_equal(out["pixel_values"], got.pixel_values)


@pytest.mark.parametrize("seed", range(6))
def test_bilinear_resize_is_bit_exact_with_torch(seed):
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(8, 700, 2))
    out_h, out_w = (int(v) for v in rng.integers(8, 900, 2))
    if seed % 2:
        out_h, out_w = height // 2 or 1, width // 2 or 1  # exact halves: every output is a rounding tie
    pixels = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    expected = F.interpolate(tensor, size=(out_h, out_w), mode="bilinear", align_corners=False)
    expected = expected.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(resize_bilinear_uint8(pixels, (out_h, out_w)), expected)


# --- fixed values, checked in -------------------------------------------------------------------------
# (width, height, max_crops) -> tiling (rows, cols), canvas (h, w) px, image_grids row, image tokens.
# Canvas side = tiling * 266 + 112 px; high-res grid = ceil(canvas / 14 / 2); global view always 14 x 14.
GEOMETRY = {
    (640, 480, 8): ((2, 2), (644, 644), [14, 14, 23, 23], 196 + 23 * 23),
    (640, 480, 4): ((2, 2), (644, 644), [14, 14, 23, 23], 196 + 23 * 23),
    (640, 480, 1): ((1, 1), (378, 378), [14, 14, 14, 14], 196 + 14 * 14),
    (300, 200, 8): ((1, 1), (378, 378), [14, 14, 14, 14], 392),
    (1000, 250, 8): ((1, 4), (378, 1176), [14, 14, 14, 42], 196 + 14 * 42),
    # narrower than the 112 px of margins: transformers' scale turns negative and picks 1 x 1 (kept as is)
    (90, 700, 8): ((1, 1), (378, 378), [14, 14, 14, 14], 392),
    (4000, 3000, 8): ((2, 3), (644, 910), [14, 14, 23, 33], 196 + 23 * 33),
    (378, 378, 8): ((1, 1), (378, 378), [14, 14, 14, 14], 392),
    (379, 379, 8): ((2, 2), (644, 644), [14, 14, 23, 23], 196 + 23 * 23),
    (50, 40, 8): ((1, 1), (378, 378), [14, 14, 14, 14], 392),
}

# sha256 of molmo2_pooling(...).astype('<i8').tobytes(), from transformers 5.23's arange_for_pooling path.
POOLING_SHA256 = {
    (1, 1): "821e93968a5b2a201302953770d22449cd46021bd0cd5efe7defb9256256b53f",
    (2, 3): "7f2f026e3c631564a2d9884345215e07e505aac70493aa8bd00c1652fe8c5b6d",
    (1, 4): "701f8f46261f09506985678c1db971387b2db5af6b3953bd635fbeed64fb3977",
    (3, 2): "25779d1a81e6c36f47c572b50c017c7890033ee36ebe69f06c0d3bf1970cdba6",
}


@pytest.mark.parametrize(("key", "expected"), GEOMETRY.items(), ids=str)
def test_fixed_geometry(key, expected):
    width, height, max_crops = key
    tiling, canvas, grid, tokens = expected
    geometry = molmo2_geometry(width, height, max_crops)
    assert geometry.tiling == tiling
    assert geometry.canvas == canvas
    assert geometry.image_grid.tolist() == grid
    assert geometry.n_image_tokens == tokens
    pooling = molmo2_pooling(geometry)
    assert pooling.shape == (tokens, 4)
    # every canvas patch and every global-view patch is pooled exactly once
    valid = np.sort(pooling[pooling >= 0])
    assert valid.tolist() == sorted(set(valid.tolist()))
    assert len(valid) == 27 * 27 + (canvas[0] // 14) * (canvas[1] // 14)


@pytest.mark.parametrize(("tiling", "digest"), POOLING_SHA256.items(), ids=str)
def test_fixed_pooling_hashes(tiling, digest):
    window = 266
    geometry = molmo2_geometry(tiling[1] * window + 112, tiling[0] * window + 112, 8)
    assert geometry.tiling == tiling
    got = hashlib.sha256(molmo2_pooling(geometry).astype("<i8").tobytes()).hexdigest()
    assert got == digest


def test_pooling_of_one_crop_by_hand():
    pooling = molmo2_pooling(molmo2_geometry(378, 378, 1))
    # global view: 27 x 27 patches padded to 28 x 28 (the odd row/column at the far side)
    assert pooling[0].tolist() == [0, 1, 27, 28]
    assert pooling[13].tolist() == [26, -1, 53, -1]  # last column: one real column
    assert pooling[195].tolist() == [27 * 26 + 26, -1, -1, -1]  # bottom-right corner
    assert pooling[196].tolist() == [729, 730, 756, 757]  # the high-res crop follows the global one


@pytest.mark.parametrize(
    ("resolution", "budget"), [(None, 8), (256, 1), (378, 1), (512, 1), (644, 4), (909, 4), (910, 8)]
)
def test_resolution_sets_the_crop_budget(resolution, budget):
    assert molmo2_crop_budget(resolution) == budget


def test_select_tiling_prefers_the_least_enlargement_then_the_least_shrinking():
    assert select_tiling(100, 100, 266, 8) == (1, 1)
    assert select_tiling(300, 100, 266, 8) == (2, 1)
    # 4000 x 3000 px is (2888, 3888) after margins: of <= 8 crops, 2 x 3 shrinks it least
    assert select_tiling(2888, 3888, 266, 8) == (2, 3)
