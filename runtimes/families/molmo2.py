"""How a Molmo2 image sits in the prompt, and the prompt's model inputs (numpy + tokenizers, torch-free).

transformers' Molmo2Processor replaces each `<|image|>` in the text with

    <low_res_im_start> (<im_patch> * low_res_cols <im_col>) * low_res_rows <im_end>
    <im_start>         (<im_patch> * high_res_cols <im_col>) * high_res_rows <im_end>

where the grid is the image's `image_grids` row [low_res_rows, low_res_cols, high_res_rows, high_res_cols]
in LLM tokens. Each <im_patch> receives one pooled image feature (added to its embedding); the other tokens
are plain embeddings. Every token listed in IMAGE_TYPE_TOKENS counts as an image token for the attention
mask (`mm_token_type_ids` = 1): image tokens of a prefill attend to each other in both directions.

`Layout` holds the processor's three switches (processor_config.json); the defaults are transformers'
(image_use_col_tokens=True, use_single_crop_col_tokens=None i.e. as image_use_col_tokens,
use_single_crop_start_token=True).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from runtimes.mrope import TokenizedPrompt
from runtimes.protocol import Image, ImageInput, RuntimeInputError, Segment

PATCH, COLUMN, START, LOW_RES_START, END = (
    "<im_patch>",
    "<im_col>",
    "<im_start>",
    "<low_res_im_start>",
    "<im_end>",
)

# The processor's `image_token_ids`: the tokens marked as image (type 1) in mm_token_type_ids.
IMAGE_TYPE_TOKENS: tuple[str, ...] = (
    PATCH,
    COLUMN,
    START,
    LOW_RES_START,
    "<frame_start>",
    END,
    "<frame_end>",
    "<im_low>",
)


@dataclass(frozen=True)
class Layout:
    """Molmo2Processor's layout switches."""

    col_tokens: bool = True  # <im_col> after each token row of the high-res view (image_use_col_tokens)
    low_res_col_tokens: bool = True  # ... and of the global view (use_single_crop_col_tokens)
    low_res_start: bool = True  # the global view opens with <low_res_im_start>, else <im_start>

    @classmethod
    def from_processor_config(cls, config: dict) -> Layout:
        col = config.get("image_use_col_tokens")
        col = True if col is None else bool(col)
        low_res_col = config.get("use_single_crop_col_tokens")
        start = config.get("use_single_crop_start_token")
        return cls(
            col_tokens=col,
            low_res_col_tokens=col if low_res_col is None else bool(low_res_col),
            low_res_start=True if start is None else bool(start),
        )


DEFAULT_LAYOUT = Layout()


def image_tokens(grid: Sequence[int], layout: Layout = DEFAULT_LAYOUT) -> list[str]:
    """Token strings of one image, in prompt order, for its [lr_rows, lr_cols, hr_rows, hr_cols] grid."""
    low_rows, low_cols, high_rows, high_cols = (int(v) for v in grid)
    low_row = [PATCH] * low_cols + ([COLUMN] if layout.low_res_col_tokens else [])
    high_row = [PATCH] * high_cols + ([COLUMN] if layout.col_tokens else [])
    low_start = LOW_RES_START if layout.low_res_start else START
    return [low_start, *low_row * low_rows, END, START, *high_row * high_rows, END]


def n_image_tokens(grid: Sequence[int], layout: Layout = DEFAULT_LAYOUT) -> int:
    """Prompt tokens one image occupies (placeholders, column and start/end tokens)."""
    low_rows, low_cols, high_rows, high_cols = (int(v) for v in grid)
    low = low_rows * (low_cols + layout.low_res_col_tokens)
    return low + high_rows * (high_cols + layout.col_tokens) + 4


def image_vocab(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of the image tokens the tokenizer has; raises if one the layout needs is missing."""
    vocab = {name: tokenizer.token_to_id(name) for name in IMAGE_TYPE_TOKENS}
    missing = [name for name in (PATCH, COLUMN, START, LOW_RES_START, END) if vocab[name] is None]
    if missing:
        raise RuntimeInputError(f"the tokenizer lacks Molmo2's image tokens {missing}")
    return {name: token for name, token in vocab.items() if token is not None}


def tokenize(
    tokenizer: Tokenizer,
    segments: Sequence[Segment],
    vocab: dict[str, int],
    start_position: int = 0,
    layout: Layout = DEFAULT_LAYOUT,
) -> TokenizedPrompt:
    """Token ids and 1-D rope positions (1, S) of a prompt; each image expands to its layout."""
    ids: list[int] = []
    images: list[ImageInput] = []
    for segment in segments:
        if isinstance(segment, Image):
            ids += [vocab[name] for name in image_tokens(segment.image.extras["image_grids"], layout)]
            images.append(segment.image)
        else:
            ids += tokenizer.encode(segment.text, add_special_tokens=False).ids
    positions = (np.arange(len(ids), dtype=np.int64) + start_position)[None]
    mask = np.array(ids, dtype=np.int64) == vocab[PATCH]  # tokens that receive an image feature
    return TokenizedPrompt(ids, positions, images, mask, start_position + len(ids))


def token_types(ids: Sequence[int], vocab: dict[str, int]) -> np.ndarray:
    """(len(ids),) int64 mm_token_type_ids: 1 on image tokens (attend to each other both ways), else 0."""
    return np.isin(np.asarray(ids, dtype=np.int64), list(vocab.values())).astype(np.int64)


def own_pooling(images: Sequence[ImageInput]) -> list[np.ndarray]:
    """Per image, its (features, 4) pooling rows indexing its own patches (-1 pads)."""
    return [image.extras["image_token_pooling"] for image in images]


def stack_images(images: Sequence[ImageInput]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Several images as one model input: (crops, 729, 588) pixels, (features, 4) pooling rows indexing
    the concatenated crops (-1 pads), (images, 4) grids - what Molmo2Processor returns for a batch of one."""
    pooling, offset = [], 0
    for image, rows in zip(images, own_pooling(images)):
        pooling.append(np.where(rows >= 0, rows + offset, -1))
        offset += image.pixel_values.shape[0] * image.pixel_values.shape[1]
    return (
        np.concatenate([image.pixel_values for image in images]),
        np.concatenate(pooling).astype(np.int64),
        np.stack([image.extras["image_grids"] for image in images]).astype(np.int64),
    )
