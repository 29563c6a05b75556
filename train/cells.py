"""Which visual tokens of a prepared image an object of the scene covers.

A Qwen3-VL image becomes a grid of tokens, one per merge x merge patches, in row-major order. An image
the model sees shows a `region` of the scene (the whole scene for a view, a crop's box for a crop), so an
object's box maps onto the token grid through that region alone, whatever size the image was resized to.
"""

from __future__ import annotations

import numpy as np

from runtimes.protocol import ImageInput

Region = tuple[float, float, float, float]  # x1, y1, x2, y2 in scene pixels, half-open


def token_grid(image: ImageInput, merge_size: int) -> tuple[int, int]:
    """(rows, columns) of the image's tokens."""
    _, height, width = image.grid_thw
    return height // merge_size, width // merge_size


def coverage(grid: tuple[int, int], region: Region, box: Region) -> np.ndarray:
    """(rows * columns,) the fraction of each token's area that `box` covers."""
    rows, columns = grid
    x1, y1, x2, y2 = region
    # the box in token units of this image
    bx = (np.array([box[0], box[2]]) - x1) / (x2 - x1) * columns
    by = (np.array([box[1], box[3]]) - y1) / (y2 - y1) * rows
    across = np.clip(
        np.minimum(bx[1], np.arange(1, columns + 1)) - np.maximum(bx[0], np.arange(columns)), 0, 1
    )
    down = np.clip(np.minimum(by[1], np.arange(1, rows + 1)) - np.maximum(by[0], np.arange(rows)), 0, 1)
    return np.outer(down, across).reshape(-1)


def token_centres(grid: tuple[int, int]) -> np.ndarray:
    """(rows * columns, 2) each token's centre as a fraction of the image's width and height."""
    rows, columns = grid
    ys, xs = np.meshgrid((np.arange(rows) + 0.5) / rows, (np.arange(columns) + 0.5) / columns, indexing="ij")
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)
