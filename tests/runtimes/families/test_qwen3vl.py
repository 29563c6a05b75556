"""runtimes.families.qwen3vl: the host-side vision tables equal what transformers' Qwen3VLVisionModel computes."""

from __future__ import annotations

import numpy as np
import pytest

from runtimes.families.qwen3vl import qwen_vision_tables

transformers = pytest.importorskip("transformers")

NUM_GRID_PER_SIDE = 12  # small learned table, so grids both larger and smaller than it are exercised


@pytest.fixture(scope="module")
def vision_model():
    import torch

    config = transformers.Qwen3VLVisionConfig(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=128,
        num_position_embeddings=NUM_GRID_PER_SIDE**2,
        deepstack_visual_indexes=[0],
    )
    torch.manual_seed(0)
    return transformers.Qwen3VLVisionModel(config).eval()


@pytest.mark.parametrize(
    "grids",
    [[(1, 8, 8)], [(1, 6, 10)], [(1, 4, 30)], [(1, 24, 2)], [(2, 4, 6)], [(1, 4, 4), (1, 6, 8)]],
    ids=["square", "landscape", "wide", "tall", "two-frames", "two-images"],
)
def test_vision_tables_match_transformers(vision_model, grids: list[tuple[int, int, int]]) -> None:
    import torch
    from transformers import vision_utils

    model = vision_model
    ours = qwen_vision_tables(grids, num_grid_per_side=model.num_grid_per_side, merge_size=2)
    grid_thw = torch.tensor(grids, dtype=torch.long)

    # The very calls Qwen3VLVisionModel.forward makes (transformers 5.x).
    indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
        grid_thw,
        num_grid_per_side=model.num_grid_per_side,
        mode=model.interpolation_mode,
        align_corners=model.interpolation_align_corners,
        spatial_merge_size=model.spatial_merge_size,
    )
    np.testing.assert_array_equal(ours.interp_indices, indices.numpy())
    np.testing.assert_array_equal(ours.interp_weights, weights.numpy())
    np.testing.assert_array_equal(
        ours.rotary_pos_ids, vision_utils.get_vision_position_ids(grid_thw, model.spatial_merge_size).numpy()
    )
    np.testing.assert_array_equal(ours.cu_seqlens, vision_utils.get_vision_cu_seqlens(grid_thw).numpy())
    assert ours.interp_indices.dtype == np.int64 and ours.interp_weights.dtype == np.float32
    assert ours.rotary_pos_ids.dtype == np.int64 and ours.cu_seqlens.dtype == np.int32

    # And the forward takes them as precomputed kwargs with the same result.
    n_patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n_patches, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(1))
    kwargs = {name: torch.from_numpy(array) for name, array in ours.as_hf_kwargs().items()}
    with torch.no_grad():
        internal = model(pixels, grid_thw=grid_thw).pooler_output
        fed = model(pixels, grid_thw=grid_thw, **kwargs).pooler_output
    torch.testing.assert_close(fed, internal, rtol=0, atol=0)


def test_vision_tables_single_grid_shapes() -> None:
    tables = qwen_vision_tables((1, 6, 10), num_grid_per_side=48, merge_size=2)
    assert tables.interp_indices.shape == (60, 4) and tables.interp_weights.shape == (60, 4)
    assert tables.rotary_pos_ids.shape == (60, 2)
    assert tables.cu_seqlens.tolist() == [0, 60]
    np.testing.assert_allclose(tables.interp_weights.sum(axis=1), 1.0, atol=1e-6)
    # First token = top-left 2x2 block, raster order inside it.
    assert tables.rotary_pos_ids[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
