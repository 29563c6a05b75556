"""Qwen3-VL: grounds with JSON boxes in 0-1000 coordinates of the image it saw; ChatML prompts."""

from __future__ import annotations

import json
from collections.abc import Sequence

from PIL import Image as PILImage

from engine.boxes import Box
from engine.families.base import Family
from engine.families.qwen3vl.parser import QWEN_SCALE, parse_qwen_grounding
from engine.families.qwen3vl.pixels import prepare_qwen_image
from engine.grounding import Grounding
from runtimes.protocol import Image, ImageInput, Segment, Text

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


class Qwen3VLFamily(Family):
    architectures = ("Qwen3VLForConditionalGeneration",)
    # Implicit Relevance Detection: localize what the question is about without answering it
    perceive_prompt = (
        "Question (for context only, do not answer it): {question}\n"
        "Identify the objects and regions in the image that are needed to answer the question. "
        'Return their 2D bounding boxes and labels as JSON: [{{"bbox_2d": [x1, y1, x2, y2], "label": "..."}}].'
    )
    reason_prompt = "{question}"

    def prepare_image(self, image: PILImage.Image, resolution: int | None, key: str) -> ImageInput:
        config = self.image_config
        pixels = prepare_qwen_image(
            image,
            resolution,
            patch_size=config.patch_size,
            merge_size=config.merge_size,
            temporal_patch_size=config.temporal_patch_size,
            mean=config.mean,
            std=config.std,
            max_pixels=config.max_pixels,
        )
        width, height = pixels.size
        return ImageInput(
            key=f"{key}@{width}x{height}",
            n_tokens=pixels.n_tokens,
            pixel_values=pixels.pixel_values,
            grid_thw=pixels.grid_thw,
        )

    def image_segments(self, image: ImageInput) -> list[Segment]:
        return [Text(VISION_START), Image(image), Text(VISION_END)]

    def parse_grounding(self, text: str, point_box_size: float = 0.1) -> Grounding:
        return parse_qwen_grounding(text, point_box_size=point_box_size)

    def grounding_target(self, boxes: Sequence[Box]) -> str:
        # integers on the 0-1000 grid, as the released model writes them (no code fence: shorter targets)
        entries = [
            {"bbox_2d": [round(c * QWEN_SCALE) for c in box.as_list()], "label": box.label} for box in boxes
        ]
        return json.dumps(entries)
