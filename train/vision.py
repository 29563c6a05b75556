"""Stage 0 of the demo model: the vision tower learns to see before the decoder learns where to look.

From random weights the tower's tokens hardly say what a small object is. A linear probe on the merged
tokens of a 256-px benchmark view (3-8 objects of 1-3% of the long side) names the colour of the object in
a token 25% of the time (chance 17%); on the raw patch embeddings it is 49%: the four random ViT blocks wash
out what little the pixels carry. The decoder then has nothing to bind the question's colour to.

So the tower is first trained alone on dense labels. Every token of a view or crop is labelled with the
colour and shape of the object covering most of it (or none), its position in the image in tenths of the
width and height (the first digit of a 0-1000 coordinate), and the tenths of that object's box corners; a
linear head per label reads the merger's output, and the heads are dropped afterwards. Position is
labelled because the decoder writes it: a tower trained on colour and shape alone (300 steps) overwrites
it where an object is, and the column of an object's token is then read on 42% of them (100% at
initialization and with the position labels). The box labels put the corners the decoder must write on
the object's own tokens, where the guided heads look. Shape is the slow label (weighted 3x): in crops-only
runs (16 crops a step) it stays at chance for 300 steps and reaches 70% of crop tokens after 1200.

Measured with `train demo`'s stage 0 (4 scenes a step, each as 4 crops and, every third step, as a view at
256 px or, one in four, 512 px; lr 2e-3; 3000 steps, 9-10 min on 2 cores), on held-out views and crops:
colour on 99% of the tokens an object covers, shape on 73% (chance 20%), box tenths on 89%, x and y tenths
on all tokens 99.7-99.9%. The earlier recipe (1000 steps, each 4 views and 12 crops, 6.5 min) read shape on
30%, and the reason stage answered shape questions at chance even from crops that held the target; now it
answers them right on 12 of 14 such rows of the held-out eval (README, "Where it stands").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image as PILImage

from engine.cropping import PixelBox, crop_image
from engine.families import Family
from evals.synth import COLORS, SHAPES, Scene
from runtimes.protocol import ImageInput
from train.cells import Region, coverage, token_centres, token_grid

NONE = 0  # the colour / shape class of a token no object covers
TENTHS = 10
NONE_WEIGHT = 0.1  # most tokens are empty: their class would swamp the loss
SHAPE_WEIGHT = 3.0  # shape is the slow label: at weight 1 it stays at chance for the first few hundred steps
IGNORE = -100  # the box label of a token no object covers


@dataclass(frozen=True)
class SeenImage:
    """An image the model sees and the part of the scene it shows."""

    image: ImageInput
    region: Region
    scene: Scene


def view(family: Family, scene: Scene, picture: PILImage.Image, resolution: int | None) -> SeenImage:
    return SeenImage(
        family.prepare_image(picture, resolution, "view"), (0, 0, scene.width, scene.height), scene
    )


def crop(family: Family, scene: Scene, picture: PILImage.Image, box: PixelBox, resolution: int) -> SeenImage:
    image = family.prepare_image(crop_image(picture, box), resolution, "crop")
    return SeenImage(image, (box.x1, box.y1, box.x2, box.y2), scene)


def token_labels(seen: SeenImage, merge_size: int) -> np.ndarray:
    """(tokens, 8) int64: colour, shape (0: none, else 1 + index), x and y tenths of each token's centre,
    then the tenths of the covering object's box x1, y1, x2, y2 in the image (IGNORE where none)."""
    grid = token_grid(seen.image, merge_size)
    covered = np.stack([coverage(grid, seen.region, obj.box) for obj in seen.scene.objects], axis=1)
    best = covered.argmax(axis=1)
    colour_names = list(COLORS)
    colours = np.array([1 + colour_names.index(obj.color) for obj in seen.scene.objects])[best]
    shapes = np.array([1 + SHAPES.index(obj.shape) for obj in seen.scene.objects])[best]
    empty = covered.max(axis=1) == 0
    colours[empty], shapes[empty] = NONE, NONE
    tenths = np.minimum((token_centres(grid) * TENTHS).astype(np.int64), TENTHS - 1)
    x1, y1, x2, y2 = seen.region
    corners = np.array([obj.box for obj in seen.scene.objects], dtype=np.float64)[best]
    fractions = (corners - [x1, y1, x1, y1]) / [x2 - x1, y2 - y1, x2 - x1, y2 - y1]
    box_tenths = np.clip((fractions * TENTHS).astype(np.int64), 0, TENTHS - 1)
    box_tenths[empty] = IGNORE
    return np.concatenate(
        [np.stack([colours, shapes, tenths[:, 0], tenths[:, 1]], axis=1), box_tenths], axis=1
    )


def vision_batch(images: Sequence[SeenImage], merge_size: int) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.from_numpy(np.concatenate([seen.image.pixel_values for seen in images])),
        "image_grid_thw": torch.tensor([seen.image.grid_thw for seen in images]),
        "labels": torch.from_numpy(np.concatenate([token_labels(seen, merge_size) for seen in images])),
    }


class DenseLabels(torch.nn.Module):
    """The vision tower with a linear head per token label; the loss is their weighted cross-entropy."""

    def __init__(self, visual: torch.nn.Module, hidden: int) -> None:
        super().__init__()
        self.visual = visual
        self.colour = torch.nn.Linear(hidden, 1 + len(COLORS))
        self.shape = torch.nn.Linear(hidden, 1 + len(SHAPES))
        self.x = torch.nn.Linear(hidden, TENTHS)
        self.y = torch.nn.Linear(hidden, TENTHS)
        self.box = torch.nn.Linear(hidden, 4 * TENTHS)  # x1, y1, x2, y2 tenths of the covering object
        for name, classes in (("colour_weight", 1 + len(COLORS)), ("shape_weight", 1 + len(SHAPES))):
            weight = torch.ones(classes)
            weight[NONE] = NONE_WEIGHT
            self.register_buffer(name, weight, persistent=False)

    def tokens(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """(tokens, hidden): the merger's output, what the decoder receives."""
        output = self.visual(pixel_values, grid_thw=image_grid_thw)
        return output[0] if isinstance(output, tuple) else output.pooler_output

    def forward(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, labels: torch.Tensor
    ) -> SimpleNamespace:
        tokens = self.tokens(pixel_values, image_grid_thw)
        cross_entropy = torch.nn.functional.cross_entropy
        loss = (
            cross_entropy(self.colour(tokens), labels[:, 0], weight=self.colour_weight)
            + SHAPE_WEIGHT * cross_entropy(self.shape(tokens), labels[:, 1], weight=self.shape_weight)
            + 0.5 * cross_entropy(self.x(tokens), labels[:, 2])
            + 0.5 * cross_entropy(self.y(tokens), labels[:, 3])
            + cross_entropy(
                self.box_logits(tokens).flatten(0, 1), labels[:, 4:].flatten(), ignore_index=IGNORE
            )
        )
        return SimpleNamespace(loss=loss)

    def box_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.box(tokens).view(-1, 4, TENTHS)

    @torch.no_grad()
    def accuracy(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Colour and shape on the tokens an object covers, position on all: what the decoder can read."""
        tokens = self.tokens(batch["pixel_values"], batch["image_grid_thw"])
        labels = batch["labels"]
        covered = labels[:, 0] != NONE
        box_hits = (self.box_logits(tokens).argmax(2) == labels[:, 4:])[covered]
        return {
            "colour": float((self.colour(tokens).argmax(1) == labels[:, 0])[covered].float().mean()),
            "shape": float((self.shape(tokens).argmax(1) == labels[:, 1])[covered].float().mean()),
            "x": float((self.x(tokens).argmax(1) == labels[:, 2]).float().mean()),
            "y": float((self.y(tokens).argmax(1) == labels[:, 3]).float().mean()),
            "box": float(box_hits.float().mean()),  # the covering object's box tenths, on covered tokens
        }
