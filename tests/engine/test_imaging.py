"""engine.imaging: loading image files safely, and the content hash the KV cache keys on."""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from engine.imaging import ImageError, ImageTooLargeError, decode_image, image_content_hash, load_image
from tests.support import blank_bitmap_png, png_bytes, structured_image

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
