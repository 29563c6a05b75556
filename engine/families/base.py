"""The family hooks and their registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from PIL import Image as PILImage

from engine.errors import UserError
from engine.grounding import Grounding
from runtimes.base import ImageConfig, ImageInput, Segment

FAMILIES: dict[str, type[Family]] = {}


class Family(ABC):
    architectures: ClassVar[tuple[str, ...]]  # HF `architectures` entries this family serves
    perceive_prompt: ClassVar[str]  # localization prompt; {question} is the user's question
    reason_prompt: ClassVar[str]  # answer prompt; {question} is the user's question

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for required in ("architectures", "perceive_prompt", "reason_prompt"):
            if not hasattr(cls, required):
                raise TypeError(f"family {cls.__name__} must define {required}")
        for architecture in cls.architectures:
            FAMILIES[architecture] = cls

    def __init__(self, image_config: ImageConfig) -> None:
        self.image_config = image_config

    @abstractmethod
    def prepare_image(self, image: PILImage.Image, resolution: int | None, key: str) -> ImageInput:
        """Resize (longest side = resolution, never upscaled) and lay out pixels for the vision tower."""

    @abstractmethod
    def image_prefix(self, image: ImageInput) -> list[Segment]:
        """[chat header][image]: the part of every prompt on this image that stages can share."""

    @abstractmethod
    def question_suffix(self, text: str, crops: Sequence[ImageInput] = ()) -> list[Segment]:
        """What follows the prefix: optional crops, the instruction, and the assistant turn's opening."""

    @abstractmethod
    def parse_grounding(self, text: str) -> Grounding:
        """Model text -> normalized boxes; never raises."""


def family_for(architecture: str, image_config: ImageConfig) -> Family:
    if architecture not in FAMILIES:
        raise UserError(
            f"model architecture {architecture!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[architecture](image_config)
