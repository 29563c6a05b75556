"""engine.imaging against transformers' Qwen2VLImageProcessor (the reference), and image loading."""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from engine.imaging import (
    ImageError,
    ImageTooLargeError,
    decode_image,
    fit_to_grid,
    image_content_hash,
    load_image,
    prepare_qwen_image,
)
from tests.support import blank_bitmap_png, png_bytes


def structured_image(width: int, height: int, seed: int) -> Image.Image:
    """Gradients, a ripple and noise: every resize and patch-order mistake shows up in the pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 127.5 + 127.5 * np.sin(x / 7 + y / 11)
    noisy = np.stack([red, green, blue], axis=-1) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


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


# -------------------------------------------------------------------------------------- load_image


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file") as caught:
        load_image(tmp_path / "missing.png")
    assert "missing.png" in str(caught.value)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_load_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.png"
    structured_image(8, 8, 0).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)  # chmod 000 would not stop root, who runs CI here
    with pytest.raises(ImageError, match=r"secret\.png: cannot read \(Permission denied\)"):
        load_image(path)


def test_load_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_load_truncated(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut.{suffix}"
    structured_image(128, 96, 3).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(path)


def test_load_corrupt_png_data(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    structured_image(64, 64, 4).save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16  # inside IDAT: the checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(path)


def test_load_too_many_pixels_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(self):
        raise AssertionError("an oversized image was decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    small = tmp_path / "small.png"
    structured_image(64, 64, 5).save(small)
    with pytest.raises(ImageError, match="64x64 = 4,096 pixels exceeds 1,000"):
        load_image(small, max_pixels=1000)

    # 120 Mpx: Pillow only warns (between 1x and 2x its limit); our header check refuses it.
    warned = tmp_path / "warned.png"
    warned.write_bytes(blank_bitmap_png(12_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak out
        with pytest.raises(ImageError, match="exceeds 100,000,000"):
            load_image(warned, max_pixels=100_000_000)

    # 400 Mpx: Pillow's own DecompressionBombError, reported as an ImageError.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(blank_bitmap_png(20_000, 20_000))
    with pytest.raises(ImageError, match=r"bomb\.png: too many pixels"):
        load_image(bomb)


def test_decode_bytes_is_checked_like_a_file(tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    structured_image(48, 32, 6).save(path)
    assert np.array_equal(np.asarray(decode_image(path.read_bytes(), "upload")), np.asarray(load_image(path)))
    with pytest.raises(ImageError, match="^upload: not an image file"):
        decode_image(b"not an image", "upload")
    with pytest.raises(ImageError, match="^upload: corrupt or truncated"):
        decode_image(path.read_bytes()[:100], "upload")
    for width, max_pixels in ((4000, 1_000_000), (20_000, 10**9)):  # our limit, then Pillow's bomb guard
        with pytest.raises(ImageTooLargeError, match="^upload: .*pixels"):
            decode_image(blank_bitmap_png(width, width), "upload", max_pixels=max_pixels)


def test_load_rgba_composites_on_white(tmp_path: Path) -> None:
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)  # opaque red
    pixels[0, 1] = (255, 0, 0, 128)  # half-transparent red
    pixels[1, 0] = (0, 0, 255, 0)  # fully transparent
    pixels[1, 1] = (0, 0, 0, 255)  # opaque black
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(path)

    image = load_image(path)
    assert image.mode == "RGB"
    rgb = np.asarray(image).astype(int)
    assert rgb[0, 0].tolist() == [255, 0, 0]
    np.testing.assert_allclose(rgb[0, 1], [255, 127, 127], atol=1)
    assert rgb[1, 0].tolist() == [255, 255, 255]
    assert rgb[1, 1].tolist() == [0, 0, 0]


def test_load_gray_palette_and_la(tmp_path: Path) -> None:
    gray = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgb = np.asarray(load_image(tmp_path / "gray.png"))
    assert rgb.shape == (4, 4, 3) and (rgb == gray[:, :, None]).all()

    palette_image = Image.new("P", (3, 1))
    palette_image.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 0] + [0] * (256 * 3 - 9))
    palette_image.putdata([0, 1, 2])
    palette_image.save(tmp_path / "palette.png", transparency=2)  # index 2 transparent
    assert np.asarray(load_image(tmp_path / "palette.png")).tolist() == [
        [[10, 20, 30], [200, 100, 0], [255, 255, 255]]
    ]

    Image.fromarray(np.array([[[50, 255], [50, 0]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png")).tolist() == [[[50, 50, 50], [255, 255, 255]]]


def test_load_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=">u2")
    path = tmp_path / "gray16.png"
    path.write_bytes(png_bytes(4, 1, 16, 0, zlib.compress(b"\0" + levels.tobytes())))
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 64, 128, 255]

    colour = np.array([[[65535, 0, 257 * 100], [0, 257 * 200, 0]]], dtype=">u2")
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_bytes(2, 1, 16, 2, zlib.compress(b"\0" + colour.tobytes())))
    assert np.asarray(load_image(path)).tolist() == [[[255, 0, 100], [0, 200, 0]]]


def test_load_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    structured_image(40, 20, 6).save(path, exif=exif)
    image = load_image(path)
    assert image.size == (20, 40) and image.mode == "RGB"


def test_image_content_hash() -> None:
    image = structured_image(16, 8, 7)
    assert image_content_hash(image) == image_content_hash(image.copy())
    changed = image.copy()
    changed.putpixel((3, 3), (0, 0, 0) if image.getpixel((3, 3)) != (0, 0, 0) else (1, 1, 1))
    assert image_content_hash(changed) != image_content_hash(image)
    same_bytes = Image.frombytes("RGB", (8, 16), image.tobytes())  # same raw bytes, other shape
    assert image_content_hash(same_bytes) != image_content_hash(image)
    assert len(image_content_hash(image)) == 64
