"""Host-side position tables of the Qwen3-VL vision encoder, in numpy (no torch).

The vision tower resamples a learned square grid of position embeddings to each image's grid and rotates
queries/keys by each patch's (row, col). transformers computes these tables inside
Qwen3VLVisionModel.forward; here they are computed on the host so that an exported vision graph takes them
as inputs (any image size, one graph) and the engine's tests can prove them equal to transformers'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class QwenVisionTables:
    """Host-side position inputs of the Qwen3-VL vision encoder, for all images of a batch concatenated.

    Rows follow the encoder's patch order (the order of QwenPixels.pixel_values: merge blocks, raster
    inside each block, frames one after another). Each equals what transformers 5.x computes inside
    Qwen3VLVisionModel.forward, which also accepts them as precomputed kwargs (see as_hf_kwargs).
    """

    # (n_patches, 4) int64: rows of the flattened learned (side x side) position-embedding table to mix,
    # the bilinear (align_corners=True) taps in order (top-left, top-right, bottom-left, bottom-right).
    interp_indices: np.ndarray
    interp_weights: np.ndarray  # (n_patches, 4) float32: the matching bilinear weights, summing to 1
    rotary_pos_ids: np.ndarray  # (n_patches, 2) int64: (row, col) in patches, for the 2-D rotary embedding
    cu_seqlens: np.ndarray  # (n_frames + 1,) int32: patch offsets of each frame; attention stays inside one

    def as_hf_kwargs(self) -> dict[str, np.ndarray]:
        """Under the keyword names Qwen3VLVisionModel.forward takes them (convert to tensors first)."""
        return {
            "interp_indices": self.interp_indices,
            "interp_weights": self.interp_weights,
            "position_ids": self.rotary_pos_ids,
            "cu_seqlens": self.cu_seqlens,
        }


def qwen_vision_tables(
    grid_thw: tuple[int, int, int] | Sequence[tuple[int, int, int]],
    *,
    num_grid_per_side: int,
    merge_size: int,
) -> QwenVisionTables:
    """Position tables for one grid (t, h, w) in patches, or a sequence of them (images in batch order).

    num_grid_per_side = sqrt(vision_config.num_position_embeddings); merge_size = spatial_merge_size.
    """
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    indices, weights, positions, frame_lengths = [], [], [], []
    for t, h, w in grids.tolist():
        if h % merge_size or w % merge_size:
            raise ValueError(f"grid {h}x{w} patches is not a multiple of merge_size={merge_size}")
        # (row, col) of every patch of one frame, in merge-block order, then repeated for each frame.
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block_shape = (h // merge_size, merge_size, w // merge_size, merge_size)
        rows = np.tile(rows.reshape(block_shape).transpose(0, 2, 1, 3).ravel(), t)
        cols = np.tile(cols.reshape(block_shape).transpose(0, 2, 1, 3).ravel(), t)

        row_taps, row_weights = _bilinear_taps(h, num_grid_per_side)
        col_taps, col_weights = _bilinear_taps(w, num_grid_per_side)
        # 2-D bilinear = outer product of the per-axis taps: (row tap, col tap) pairs, row-major.
        flat = row_taps[rows][:, :, None] * num_grid_per_side + col_taps[cols][:, None, :]
        indices.append(flat.reshape(-1, 4))
        weights.append((row_weights[rows][:, :, None] * col_weights[cols][:, None, :]).reshape(-1, 4))
        positions.append(np.stack([rows, cols], axis=-1))
        frame_lengths += [h * w] * t

    return QwenVisionTables(
        interp_indices=np.concatenate(indices).astype(np.int64),
        interp_weights=np.concatenate(weights).astype(np.float32),
        rotary_pos_ids=np.concatenate(positions).astype(np.int64),
        cu_seqlens=np.concatenate([[0], np.cumsum(frame_lengths)]).astype(np.int32),
    )


def _bilinear_taps(size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Source taps (size, 2) and weights (size, 2) resampling a side-long axis to size positions.

    align_corners=True: the first and last positions land exactly on the first and last table entries.
    Computed in float32 with the same operation order as transformers, so weights match bit for bit.
    """
    index = np.arange(size, dtype=np.float32)
    source = index * np.float32(side - 1) / np.float32(max(size - 1, 1))  # fractional table position
    floor = np.floor(source)
    offsets = np.arange(2)  # the tap at floor and the one after it
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(source[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.clip(np.float32(1) - distance, 0, None)
