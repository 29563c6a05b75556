"""Token ids and M-RoPE positions of a prompt made of segments (Qwen3-VL layout), in numpy.

An image of grid (t, h, w) patches occupies t*h*w/merge² placeholder tokens but only max(h, w)/merge
rope positions: its tokens sit at (t0, row, col) offsets from the position where it starts, and the text
after it resumes at start + max(h, w)/merge. Every runtime computes positions here, host-side, so the
rules live in one place and a suffix continues exactly where its prefix stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from runtimes.protocol import Image, ImageInput, Prefix, Segment


@dataclass
class TokenizedPrompt:
    token_ids: list[int]
    positions: np.ndarray  # (3, S) int64: temporal, height, width rope positions ((1, S) for 1-D rope)
    images: list[ImageInput]  # in prompt order
    image_mask: np.ndarray  # (S,) bool: placeholder tokens filled by image embeddings
    next_position: int  # rope position of the token after this prompt

    def prefix(self, variant: str, state: object) -> Prefix:
        """This prompt as a prefix, its KV (`state`, the runtime's handle) computed from scratch."""
        return Prefix(
            variant=variant,
            token_ids=self.token_ids,
            next_position=self.next_position,
            computed_tokens=len(self.token_ids),
            state=state,
            images=tuple(self.images),
        )


@dataclass(frozen=True)
class Layout:
    """What a Qwen3-VL checkpoint fixes of its prompts' tokens and positions (config.json, or the manifest)."""

    image_token_id: int  # the placeholder the image embeddings replace
    merge_size: int  # patches per token side

    def tokenize(
        self, tokenizer: Tokenizer, segments: Sequence[Segment], start_position: int
    ) -> TokenizedPrompt:
        return tokenize(
            tokenizer,
            segments,
            image_token_id=self.image_token_id,
            merge_size=self.merge_size,
            start_position=start_position,
        )


def tokenize(
    tokenizer: Tokenizer,
    segments: Sequence[Segment],
    *,
    image_token_id: int,
    merge_size: int,
    start_position: int = 0,
) -> TokenizedPrompt:
    ids: list[int] = []
    chunks: list[np.ndarray] = []
    images: list[ImageInput] = []
    position = start_position
    for segment in segments:
        if isinstance(segment, Image):
            image = segment.image
            t, h, w = image.grid_thw
            rows, cols = h // merge_size, w // merge_size
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(rows), np.arange(cols), indexing="ij")
            chunks.append(np.stack([tt, hh, ww]).reshape(3, -1) + position)
            ids.extend([image_token_id] * image.n_tokens)
            images.append(image)
            position += max(rows, cols)
        else:
            text_ids = tokenizer.encode(segment.text, add_special_tokens=False).ids
            chunks.append(np.broadcast_to(np.arange(len(text_ids)) + position, (3, len(text_ids))))
            ids.extend(text_ids)
            position += len(text_ids)
    positions = np.concatenate(chunks, axis=1).astype(np.int64) if chunks else np.zeros((3, 0), np.int64)
    mask = np.array(ids, dtype=np.int64) == image_token_id if ids else np.zeros(0, bool)
    return TokenizedPrompt(ids, positions, images, mask, position)


def decode_positions(next_position: int, steps: int) -> np.ndarray:
    """(3, steps) positions of text tokens continuing a sequence."""
    return np.broadcast_to(np.arange(steps, dtype=np.int64) + next_position, (3, steps)).copy()
