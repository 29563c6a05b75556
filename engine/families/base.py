"""The family hooks and their registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from PIL import Image as PILImage

from engine.boxes import Box
from engine.grounding import Grounding
from runtimes.protocol import Image, ImageConfig, ImageInput, Segment, Text
from runtimes.registry import Registered, Registry


class Family(Registered, ABC):
    registry = Registry("engine")
    perceive_prompt: ClassVar[str]  # localization prompt; {question} is the user's question
    reason_prompt: ClassVar[str]  # answer prompt; {question} is the user's question
    chat_header: ClassVar[str] = "<|im_start|>user\n"  # opens the user turn, before the image
    turn_end: ClassVar[str] = "<|im_end|>\n<|im_start|>assistant\n"  # closes it and opens the answer
    crops_intro: ClassVar[str] = (
        "The first image is the whole scene; the others are close-up crops of the regions relevant to the "
        "question.\n"
    )
    # True when image tokens attend to each other across images (bidirectionally): then every image of a
    # prompt must be prefilled in one chunk, so images in a suffix (crops) join the prefix instead.
    images_attend_each_other: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for required in ("perceive_prompt", "reason_prompt"):
            if not hasattr(cls, required):
                raise TypeError(f"family {cls.__name__} must define {required}")

    def __init__(self, image_config: ImageConfig) -> None:
        self.image_config = image_config

    @abstractmethod
    def prepare_image(self, image: PILImage.Image, resolution: int | None, key: str) -> ImageInput:
        """Resize (longest side = resolution, never upscaled) and lay out pixels for the vision tower."""

    def image_segments(self, image: ImageInput) -> list[Segment]:
        """An image as the prompt carries it (some families wrap it in marker tokens)."""
        return [Image(image)]

    def image_prefix(self, image: ImageInput) -> list[Segment]:
        """[chat header][image]: the part of every prompt on this image that stages can share."""
        return [Text(self.chat_header), *self.image_segments(image)]

    def question_suffix(self, text: str, crops: Sequence[ImageInput] = ()) -> list[Segment]:
        """What follows the prefix: optional crops, the instruction, and the assistant turn's opening."""
        segments: list[Segment] = [Text(self.crops_intro)] if crops else []
        for crop in crops:
            segments += self.image_segments(crop)
        return [*segments, Text(text + self.turn_end)]

    @abstractmethod
    def parse_grounding(self, text: str, point_box_size: float = 0.1) -> Grounding:
        """Model text -> normalized boxes (a point becomes a square of side point_box_size); never raises."""

    @abstractmethod
    def grounding_target(self, boxes: Sequence[Box]) -> str:
        """Normalized boxes (with labels) -> the text this family grounds with: the perceive stage's
        training target, which `parse_grounding` reads back."""


def family_for(architecture: str, image_config: ImageConfig) -> Family:
    return Family.registry.lookup(architecture)(image_config)
