"""Molmo2: points with `<points coords="...">` in 0-1000 of the image it saw; Qwen3-style chat turns.

Prompt layout, as transformers' Molmo2Processor builds it from the chat template:

    <|im_end|><|im_start|>user\n[image tokens]{question}<|im_end|>\n<|im_start|>assistant\n

The leading token is the processor's BOS: it prepends `bos_token`, or `eos_token` when there is none, which
for the Qwen3-based checkpoints is <|im_end|> (their generation_config has bos_token_id = <|im_end|>).
The image placeholder `<|image|>` is expanded by the runtime (runtimes/families/molmo2.py); here an image is
one `Image` segment. Images come before the text of the user turn, as in Molmo2's chat template.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image as PILImage

from engine.boxes import Box
from engine.families.base import Family
from engine.families.molmo2.parser import MOLMO2_SCALE, parse_molmo_points
from engine.families.molmo2.pixels import CropScheme, prepare_molmo2_image
from engine.grounding import Grounding
from runtimes.families.molmo2 import n_image_tokens
from runtimes.protocol import Image, ImageInput, Segment, Text

BOS = "<|im_end|>"


class Molmo2Family(Family):
    architectures = ("Molmo2ForConditionalGeneration",)
    # Implicit Relevance Detection in Molmo's own idiom: its pointing data is asked as "Point to ...".
    perceive_prompt = (
        "Question (for context only, do not answer it): {question}\n"
        "Point to the objects and regions in the image that are needed to answer the question."
    )
    reason_prompt = "{question}"
    chat_header = f"{BOS}<|im_start|>user\n"
    # transformers' Molmo2 attends bidirectionally among all image tokens of a prompt
    images_attend_each_other = True

    def prepare_image(self, image: PILImage.Image, resolution: int | None, key: str) -> ImageInput:
        """Crops and pooling of the image; `resolution` sets the crop budget (engine/families/molmo2/pixels.py).

        n_tokens counts transformers' default layout; a checkpoint whose processor_config.json drops the
        global view's <im_col> tokens takes 14 fewer, and the runtime lays out what the checkpoint asks.
        """
        config = self.image_config
        scheme = CropScheme.of(config)
        pixels = prepare_molmo2_image(image, resolution, scheme=scheme, mean=config.mean, std=config.std)
        geometry = pixels.geometry
        rows, cols = geometry.tiling
        return ImageInput(
            key=f"{key}@molmo2:{rows}x{cols}",  # the crop tiling fixes every pixel the model sees
            n_tokens=n_image_tokens(geometry.image_grid),
            pixel_values=pixels.pixel_values,  # (crops, 729, 588) float32
            # crops x patches per crop side (not Qwen's t, h, w)
            grid_thw=(geometry.n_crops, scheme.crop_patches, scheme.crop_patches),
            extras={
                "image_grids": geometry.image_grid,  # (4,) tokens: low-res rows, cols, high-res rows, cols
                "image_token_pooling": pixels.image_token_pooling,  # (features, 4) patch indices, -1 pads
            },
        )

    def question_suffix(self, text: str, crops: Sequence[ImageInput] = ()) -> list[Segment]:
        """Crops right after the view, then the words: Molmo2's template puts a turn's images before its
        text, and one unbroken run of images is one bidirectional block any runtime can prefill at once."""
        intro = self.crops_intro if crops else ""
        return [*(Image(crop) for crop in crops), Text(intro + text + self.turn_end)]

    def parse_grounding(self, text: str, point_box_size: float = 0.1) -> Grounding:
        return parse_molmo_points(text, point_box_size=point_box_size)

    def grounding_target(self, boxes: Sequence[Box]) -> str:
        """One `<points>` tag per label, each box as its centre point (Molmo2 points, it does not box)."""
        tags = []
        for label in dict.fromkeys(box.label for box in boxes):
            centres = [box.center for box in boxes if box.label == label]
            coords = " ".join(
                f"{i} {round(x * MOLMO2_SCALE):03d} {round(y * MOLMO2_SCALE):03d}"
                for i, (x, y) in enumerate(centres, 1)
            )
            tags.append(f'<points coords="1 {coords}">{label}</points>')
        return " ".join(tags)
