"""`sparc-engine train demo`: the demo model, a small Qwen3-VL trained from scratch on synthetic shapes.

The model is the real architecture at a few million parameters (export/tiny.py builds it), trained on
scenes of the synthetic benchmark (evals/synth.py) with the engine's own prompts and numpy pixels
(train/examples.py). Every step is a fixed mix of three kinds of sequences:

  perceive  the view at 256 or 512 px + the spec's perceive prompt -> the target's bbox_2d JSON
  reason    the view + crops planned by the demo spec's crop stage around a jittered target box
            (sometimes with a distractor's crop, sometimes missing the target) -> the answer
  view      the view alone at 256, 512 or full resolution (the baselines) -> the answer

Before all that, the vision tower is trained alone on dense per-token labels (train/vision.py): from
random weights its tokens hardly say what a small object is. After the mixed phase, a find phase trains
mostly localization among distractors with the attention guide's find term (FIND_PHASE). Then `train
perception-lora` fits the perception variant on a synthetic training set. Scenes are drawn from (seed,
step), so the same seed gives the same checkpoint on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from tokenizers import Tokenizer
from transformers import AutoModelForImageTextToText

from engine.boxes import Box
from engine.cropping import PixelBox, crop_image
from engine.errors import UserError
from engine.families import Family, family_for
from engine.spec import CropSpec, Spec, load_spec
from evals.synth import COLORS, SHAPES, Scene, render, sample_scene
from export.tiny import COMPLETE_MARKER, TinyQwen3VLSizes, build_tiny_qwen3vl
from runtimes.protocol import ImageInput
from runtimes.torch_ref.checkpoint import read_json
from runtimes.torch_ref.family import TorchFamily, torch_family_for
from runtimes.torch_ref.runtime import pick_device
from train.cells import coverage, token_grid
from train.examples import TrainingSequence, by_length, collate, encode, perceive_segments, reason_segments
from train.guide import AttentionGuide, GuideWeights, guided_batch
from train.heldout import Heldout, Probe, informative_position, make_probe, probe_losses
from train.loop import Curve, Schedule, fit, on_device, prefetched
from train.report import write_training_report
from train.vision import DenseLabels, SeenImage, crop, view, vision_batch

# About 4.4M parameters. The processor caps images at 1024x1024 px (1024 visual tokens), which makes
# `resolution: full` the 1024-token baseline and keeps its vision attention affordable on a CPU.
DEMO_SIZES = TinyQwen3VLSizes(
    vision_depth=4,
    vision_hidden=128,
    vision_heads=4,
    vision_intermediate=256,
    num_position_embeddings=256,  # a learned 16x16 grid, resampled to each image
    deepstack_visual_indexes=(1,),
    text_layers=4,
    text_hidden=256,
    text_heads=8,
    text_kv_heads=4,
    head_dim=32,
    text_intermediate=512,
    init_std=0.02,
    max_pixels=1024 * 1024,
    # white pixels become 0: the background adds nothing to the patch embeddings, so the few patches
    # holding an object stand out from the first step instead of being a 2% ripple on a large constant
    image_mean=(1.0, 1.0, 1.0),
)
# Scene sizes drawn for training, square and not. 4096-px scenes are left out: rendering them costs more than a training step, and the views and crops the
# model sees are the same sizes at any scale (the eval checks 4096 px).
TRAIN_SIZES = ((1024, 1024), (1024, 768), (768, 1024), (1536, 1536), (2048, 2048), (2048, 1536), (1536, 2048))
OBJECTS = (3, 8)  # per scene, the target included: the synth default
OBJECT_SIZE = (0.01, 0.03)  # side / longest image side: the synth default
# The demo model grounds on a 1/20 grid: the target's box snapped outwards to multiples of 50 on Qwen's
# 0-1000 scale, so a box is 50 or 100 wide and high. A 4M model trained for minutes cannot place an object
# of 2-8 px of its 256-px view to the unit; with exact boxes it spent its coordinate loss on the second and
# third digits, which it cannot know, and wrote x2, y2 as copies of x1, y1 (zero-area boxes, dropped by the
# parser). On the grid the third digit is always 0, the second 0 or 5, and x2 is x1 + 50 or + 100: only
# the first digits depend on the image. The crop stage pads the box anyway (min_fraction 0.1 of the image).
BOX_GRID = 0.05


@dataclass(frozen=True)
class Curriculum:
    """The target starts alone and distractors join it: objects per scene grow from 1 to OBJECTS between
    `alone` and `alone + ramp` of the steps. Objects are the benchmark's size (OBJECT_SIZE) throughout.

    The decoder learns to read the target's position off its tokens on single objects first (the guide,
    train/guide.py, makes that about 3 times faster); the guided heads then carry it over to crowded
    scenes. Measured perceive-only (frozen stage-0 tower, batch 16, 1000 steps: 300 alone, 300 of ramp),
    the held-out first-coordinate-digit loss on 3-8-object scenes fell from chance (2.30) to 1.34; with
    3-8 objects from the first step it stayed at 2.17-2.29 after 400 steps. A curriculum on the size
    instead (one large object shrinking to 1-3%) lost the target once distractors joined.
    """

    alone: float = 0.3
    ramp: float = 0.3

    def objects(self, step: int, steps: int) -> tuple[int, int]:
        """(fewest, most) objects per scene at `step` of `steps`."""
        progress = min(1.0, max(0.0, (step - self.alone * steps) / max(1.0, self.ramp * steps)))
        return 1 + round(progress * (OBJECTS[0] - 1)), 1 + round(progress * (OBJECTS[1] - 1))


@dataclass(frozen=True)
class Slot:
    """One sequence of every step's batch: what it trains and at which view resolution (None: full)."""

    task: str  # perceive | reason | view
    resolution: int | None

    @property
    def name(self) -> str:
        return f"{self.task}@{self.resolution or 'full'}"


# Two slots per scene (a scene is rendered once for both). Perceive and reason dominate: they are SPARC;
# the view-only slots train the baselines the eval compares against.
STEP_SLOTS: tuple[tuple[Slot, Slot], ...] = (
    (Slot("perceive", 256), Slot("reason", 256)),
    (Slot("perceive", 256), Slot("reason", 256)),
    (Slot("perceive", 256), Slot("reason", 256)),
    (Slot("perceive", 256), Slot("view", 256)),
    (Slot("perceive", 512), Slot("reason", 512)),
    (Slot("perceive", 256), Slot("view", 512)),
    (Slot("perceive", 512), Slot("reason", 256)),
    (Slot("perceive", 256), Slot("view", 256)),
)
# A full-resolution view (up to 1024 tokens) costs as much as the rest of a step: one every few steps.
FULL_VIEW = Slot("view", None)
FULL_VIEW_EVERY = 4


@dataclass(frozen=True)
class Phase:
    """A stretch of the decoder's training: what each step holds and how the attention guide weighs it."""

    name: str
    scenes: tuple[tuple[Slot, ...], ...]  # per step, one scene per entry, seen by each of its slots
    full_view_every: int
    guide: GuideWeights
    curriculum: bool  # objects per scene grow as Curriculum says (else the benchmark's count throughout)
    rng_word: tuple[int, ...]  # appended to [seed, step]: each phase draws its own scenes


# Everything at once: localization, answers from crops, the baselines, with the count curriculum.
MIX_PHASE = Phase("mixed phase", STEP_SLOTS, FULL_VIEW_EVERY, GuideWeights(everywhere=0.5), True, ())
# Then localization among the benchmark's distractors with the guide's find term alone (train/guide.py):
# the mixed phase leaves the model writing the first digit of an arbitrary object (the guided heads' mass on
# the target at that position 0.33 with 3 objects, 0.17 with 8). Fine-tuned this way, localization alone,
# from that checkpoint, the first digit's teacher-forced accuracy went 28% -> 66% and the mass 0.22 -> 0.97
# in 800 steps. From scratch the find term did not work: the heads settled on every object at once. Some
# answer and view sequences per step keep the other tasks trained (with 2 answers of 18 sequences the
# answer-from-crops probe rose from 0.62 to 1.21 over the phase; 4 here).
_PERCEIVE_256, _PERCEIVE_512 = Slot("perceive", 256), Slot("perceive", 512)
FIND_PHASE = Phase(
    "find phase",
    (
        *((_PERCEIVE_256, Slot("reason", 256)),) * 4,
        (_PERCEIVE_256, Slot("view", 256)),
        (_PERCEIVE_512, Slot("view", 512)),
        *((_PERCEIVE_256,),) * 4,
        *((_PERCEIVE_512,),) * 2,
    ),
    FULL_VIEW_EVERY * 2,
    GuideWeights(everywhere=0.0, find=2.0),
    False,
    (4,),  # never a mixed step's [seed, step], stage 0's [seed, step, 2] nor the probes' [seed, 0, 1 | 3]
)
# One scene in COLOR_EVERY asks for a colour: the target is then named by a shape, which a 256-px view does
# not show (objects are 2-8 px), so SPARC there can at best match the view-only baseline; shape questions
# are where the crops pay and where localization can be learned.
COLOR_EVERY = 4
VISION_SCENES = 4  # per stage-0 step: each seen as crops around random objects of it ...
VISION_CROPS_PER_SCENE = 4
VISION_VIEW_EVERY = 3  # ... and, every third step, as a view too (at 256 px, one in four at 512)
VISION_LR = 2e-3
HELDOUT_PER_TASK = 16  # sequences per held-out probe (a quarter of that for the full-resolution view)
MICRO_BATCH_TOKENS = 2600  # padded tokens per forward (see train.examples.by_length)
# What training.json and training.png follow besides the loss (train/heldout.py): one probe per task.
HELDOUT_SLOTS = (Slot("perceive", 256), Slot("reason", 256), Slot("view", 256), FULL_VIEW)


@dataclass(frozen=True)
class CropSimulation:
    """How the reason slots imitate the perceive stage's output before the crop stage plans crops."""

    center_std: float = 0.012  # normalized: the localization error of a trained perceive stage
    size_log_std: float = 0.3  # predicted box size, log-normal around the true size
    extra_distractor: float = 0.25  # probability of a second crop, on another object
    miss: float = 0.1  # probability that the only crop is on another object


class DemoData:
    """Deterministic training sequences: step s of seed k is always the same batch."""

    def __init__(self, family: Family, torch_family: TorchFamily, spec: Spec, seed: int, steps: int) -> None:
        crop = spec.stage(CropSpec)
        if crop is None:
            raise UserError(
                "the demo trains its reason stage on the spec's crops; the spec has no crop stage"
            )
        self.family, self.torch_family, self.crop, self.seed = family, torch_family, crop, seed
        self.prompts = spec.prompts.with_defaults(family.perceive_prompt, family.reason_prompt)
        self.steps, self.curriculum = steps, Curriculum()
        self.simulation = CropSimulation()

    def step(self, step: int, phase: Phase = MIX_PHASE) -> list[TrainingSequence]:
        rng = np.random.default_rng([self.seed, step, *phase.rng_word])
        fewest, most = self.curriculum.objects(step, self.steps) if phase.curriculum else OBJECTS
        sequences = []
        for scene_index, slots in enumerate(phase.scenes):
            width, height = TRAIN_SIZES[rng.integers(len(TRAIN_SIZES))]
            kind = "color" if (step + scene_index) % COLOR_EVERY == 0 else "shape"
            count = int(rng.integers(fewest, most + 1))
            scene = sample_scene(rng, width, height, count, object_size=OBJECT_SIZE, kind=kind)
            image = render(scene)
            sequences += [self.sequence(slot, scene, image, rng) for slot in slots]
        if step % phase.full_view_every == 0:
            sequences.append(self.sequence(FULL_VIEW, scene, image, rng))
        return sequences

    def vision_step(self, step: int) -> list[SeenImage]:
        # three words: never a decoder step's [seed, step] nor the probes' [seed, 0, 1]
        rng = np.random.default_rng([self.seed, step, 2])
        return self.vision_images(rng, views=step % VISION_VIEW_EVERY == 0)

    def vision_heldout(self) -> list[SeenImage]:
        return self.vision_images(np.random.default_rng([self.seed, 0, 3]), views=True)

    def vision_images(self, rng: np.random.Generator, views: bool) -> list[SeenImage]:
        """Stage 0's images: benchmark scenes as crops around some of their objects, and as views.

        Mostly crops: shape, which only crops show, is the label the tower learns last, and a crop (25
        tokens) costs a fraction of a view. Colour and position, which the views teach, are learned in a
        few hundred steps; shape on crops needs thousands (a linear probe on the pooled crop tokens of an
        object read its shape on 47% after 1000 steps of 4 views and 12 crops, on 85% after 3000 steps of
        16 crops).
        """
        images = []
        for index in range(VISION_SCENES):
            scene = self.benchmark_scene(rng, ("shape", "color")[index % 2])
            picture = render(scene)
            if views:
                images.append(view(self.family, scene, picture, (256, 512)[index % 4 == 3]))
            for _ in range(VISION_CROPS_PER_SCENE):
                around = self.predicted(scene, int(rng.integers(len(scene.objects))), rng)
                box = self.crop.plan([around], scene.width, scene.height)[0]  # one box plans one crop
                images.append(crop(self.family, scene, picture, box, self.crop.resolution))
        return images

    def benchmark_scene(self, rng: np.random.Generator, kind: str) -> Scene:
        return sample_scene(
            rng,
            *TRAIN_SIZES[rng.integers(len(TRAIN_SIZES))],
            int(rng.integers(OBJECTS[0], OBJECTS[1] + 1)),
            object_size=OBJECT_SIZE,
            kind=kind,
        )

    def probes(self, per_task: int) -> list[Probe]:
        """Held-out sequences of the benchmark's scenes, from a random stream no training step draws."""
        rng = np.random.default_rng([self.seed, 0, 1])  # three words: never a step's [seed, step]
        tokenizer = self.torch_family.tokenizer
        probes = []
        for slot in HELDOUT_SLOTS:
            scenes = [
                self.benchmark_scene(rng, ("shape", "color")[index % 2])
                for index in range(per_task if slot.resolution else max(2, per_task // 4))
            ]
            sequences = [self.sequence(slot, scene, render(scene), rng) for scene in scenes]
            answers = [SHAPES if scene.kind == "shape" else tuple(COLORS) for scene in scenes]
            probes.append(
                make_probe(
                    slot.name, sequences, tokenizer, grounding=slot.task == "perceive", answers=answers
                )
            )
        return probes

    def sequence(
        self, slot: Slot, scene: Scene, image: PILImage.Image, rng: np.random.Generator
    ) -> TrainingSequence:
        family = self.family
        view_input = family.prepare_image(image, slot.resolution, "view")
        if slot.task == "perceive":
            segments = perceive_segments(family, self.prompts["perceive"], scene.question, view_input)
            target_box = Box(*snapped(_normalized(scene.objects[0].box, scene)), label=scene.label)
            grid = token_grid(view_input, family.image_config.merge_size)
            covered = coverage(grid, (0, 0, scene.width, scene.height), scene.objects[0].box) > 0
            sequence = encode(self.torch_family, segments, family.grounding_target([target_box]), covered)
            if scene.kind != "shape":  # named by its shape, which a view hardly shows: nothing to find it by
                return sequence
            first_digit = informative_position(sequence, self.torch_family.tokenizer, grounding=True)
            return replace(
                sequence, find_through=first_digit - (len(sequence.prompt.token_ids) - sequence.n_target) + 1
            )
        crops = self.crops(scene, image, rng) if slot.task == "reason" else []
        segments = reason_segments(family, self.prompts["reason"], scene.question, view_input, crops)
        return encode(self.torch_family, segments, scene.answer)

    def crops(self, scene: Scene, image: PILImage.Image, rng: np.random.Generator) -> list[ImageInput]:
        resolution = self.crop.resolution
        return [
            self.family.prepare_image(crop_image(image, box), resolution, "crop")
            for box in self.crop_boxes(scene, rng)
        ]

    def crop_boxes(self, scene: Scene, rng: np.random.Generator) -> list[PixelBox]:
        """The crop stage's plan (spec padding, min side, max crops) around simulated perceive boxes."""
        sim = self.simulation
        others = list(range(1, len(scene.objects)))
        chosen = [0]
        if others and rng.random() < sim.miss:
            chosen = [int(rng.choice(others))]
        elif others and rng.random() < sim.extra_distractor:
            chosen = [0, int(rng.choice(others))] if rng.random() < 0.5 else [int(rng.choice(others)), 0]
        boxes = [self.predicted(scene, index, rng) for index in chosen]
        return self.crop.plan(boxes, scene.width, scene.height)

    def predicted(self, scene: Scene, index: int, rng: np.random.Generator) -> Box:
        x1, y1, x2, y2 = _normalized(scene.objects[index].box, scene)
        cx, cy = np.array([(x1 + x2) / 2, (y1 + y2) / 2]) + rng.normal(0, self.simulation.center_std, 2)
        scale = float(np.exp(rng.normal(0, self.simulation.size_log_std)))
        half_w, half_h = (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
        return Box.from_corners(cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def _normalized(box: tuple[int, int, int, int], scene: Scene) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return x1 / scene.width, y1 / scene.height, x2 / scene.width, y2 / scene.height


def snapped(box: Sequence[float], grid: float = BOX_GRID) -> tuple[float, float, float, float]:
    """A normalized box grown to the smallest box of the grid that holds it (BOX_GRID)."""
    cells = 1 / grid
    x1, y1, x2, y2 = (round(c * cells, 6) for c in box)  # 0.15 * 20 must stay 3, not 3.0000000001
    return (
        math.floor(x1) / cells,
        math.floor(y1) / cells,
        min(cells, max(math.ceil(x2), math.floor(x1) + 1)) / cells,
        min(cells, max(math.ceil(y2), math.floor(y1) + 1)) / cells,
    )


def snap_rows(rows: Path) -> None:
    """Rewrite a synthetic dataset's boxes (pixels) onto the demo's grid, so its LoRA learns the same
    boxes as the base model."""
    lines = []
    for line in rows.read_text().splitlines():
        row = json.loads(line)
        width, height = row["width"], row["height"]
        scale = (width, height, width, height)
        row["boxes"] = [
            [round(c * s) for c, s in zip(snapped([c / s for c, s in zip(box, scale)]), scale)]
            for box in row["boxes"]
        ]
        lines.append(json.dumps(row) + "\n")
    rows.write_text("".join(lines))


def open_checkpoint(model_dir: Path) -> tuple[Family, TorchFamily]:
    config = read_json(model_dir / "config.json")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    torch_family = torch_family_for(config, tokenizer, model_dir)
    return family_for(config["architectures"][0], torch_family.image_config()), torch_family


def position_table(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) smooth 2-D sinusoids over the unit square, a few cycles per axis.

    Qwen3-VL resamples this learned table to every image's patch grid, so it says where a patch is as a
    fraction of the image, exactly the 0-1000 coordinates the model must write. Starting from it, rather
    than from the usual 0.02-scale noise, the model can read positions out from the first steps.
    """
    grid = torch.linspace(0, 1, side)
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    frequencies = 2.0 ** torch.linspace(-1.0, 2.5, dim // 4)  # 0.5 to 5.7 cycles across the image
    waves = []
    for frequency in frequencies:
        for axis in (xs, ys):
            waves += [torch.sin(2 * torch.pi * frequency * axis), torch.cos(2 * torch.pi * frequency * axis)]
    return torch.stack(waves, dim=-1).reshape(side * side, -1)[:, :dim]


def train_base(
    out: Path,
    *,
    seed: int,
    steps: int,
    lr: float,
    find_steps: int,
    find_lr: float,
    spec: Path,
    save_every: int,
    eval_every: int,
    vision_steps: int,
    device: str = "cpu",
) -> tuple[dict[str, Curve], dict[str, float], Heldout]:
    """Build the checkpoint with random weights, train its vision tower (stage 0), then the whole model in
    two phases (MIX_PHASE for `steps`, FIND_PHASE for `find_steps`), and save it in place (also every
    save_every steps, so a killed run leaves its latest weights). The held-out probes run every eval_every
    steps. Returns the curves, the tower's held-out accuracy and the probes."""
    build_tiny_qwen3vl(out, seed=seed, sizes=DEMO_SIZES)
    family, torch_family = open_checkpoint(out)
    data = DemoData(family, torch_family, load_spec(spec), seed, steps)
    probes = data.probes(HELDOUT_PER_TASK)
    heldout = Heldout({probe.name: round(probe.chance, 4) for probe in probes})
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    table = model.model.visual.pos_embed.weight
    with torch.no_grad():
        table.copy_(position_table(math.isqrt(table.shape[0]), table.shape[1]))
    model.to(device)
    vision_curve, vision_accuracy = train_vision(model, data, vision_steps, device)
    # frozen: trained with the decoder, the tower washes the position out of an object's own tokens
    # (its column read on 43% of them after 400 steps, 95% after stage 0)
    model.model.visual.requires_grad_(False)
    guide = AttentionGuide(model)

    def measure() -> dict[str, float]:
        return probe_losses(
            model, probes, lambda group: on_device(collate(torch_family, group), device), MICRO_BATCH_TOKENS
        )

    def batches(step: int, sequences_of: Callable[[int], list[TrainingSequence]], done: int) -> list[dict]:
        """A phase's step `step`; `done` decoder steps came before it (probes and saves count across phases)."""
        sequences = sequences_of(step)
        if done + step and (done + step) % save_every == 0:
            model.save_pretrained(out)
        if (done + step) % eval_every == 0:
            heldout.record(done + step, measure())
        return [
            on_device(guided_batch(torch_family, group), device)
            for group in by_length(sequences, MICRO_BATCH_TOKENS)
        ]

    curves = {"vision tower (stage 0)": vision_curve}
    done = 0
    for phase, schedule in (
        (MIX_PHASE, Schedule(steps=steps, lr=lr, warmup=min(100, steps // 10 + 1))),
        (FIND_PHASE, Schedule(steps=find_steps, lr=find_lr, warmup=min(20, find_steps // 10 + 1))),
    ):
        if not schedule.steps:
            continue
        with prefetched(partial(data.step, phase=phase), schedule.steps) as sequences_of:
            curves[phase.name] = fit(
                model,
                partial(batches, sequences_of=sequences_of, done=done),
                schedule,
                loss_of=partial(guide.loss, weights=phase.guide),
                description=phase.name,
            )
        done += schedule.steps
    heldout.record(done, measure())
    model.save_pretrained(out)
    # the builder's completion marker records the random weights' checksum: no longer these weights
    (out / COMPLETE_MARKER).unlink(missing_ok=True)
    return curves, vision_accuracy, heldout


def train_vision(
    model: torch.nn.Module, data: DemoData, steps: int, device: str
) -> tuple[Curve, dict[str, float]]:
    """Stage 0 (train/vision.py): the tower alone on dense token labels; its held-out accuracy after."""
    merge_size = data.family.image_config.merge_size
    dense = DenseLabels(model.model.visual, model.config.text_config.hidden_size).to(device)

    with prefetched(lambda step: vision_batch(data.vision_step(step), merge_size), steps) as batch_of:
        curve = fit(
            dense,
            lambda step: [on_device(batch_of(step), device)],
            Schedule(steps=steps, lr=VISION_LR, warmup=min(30, steps // 10 + 1)),
            description="vision tower",
        )
    heldout = on_device(vision_batch(data.vision_heldout(), merge_size), device)
    return curve, {name: round(value, 3) for name, value in dense.accuracy(heldout).items()}


def train_demo_command(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    out: Path = args.out
    start = time.perf_counter()
    device = pick_device(args.device)
    curves, vision_accuracy, heldout = train_base(
        out,
        seed=args.seed,
        steps=args.steps,
        lr=args.lr,
        find_steps=args.find_steps,
        find_lr=args.find_lr,
        spec=args.spec,
        save_every=args.save_every,
        eval_every=args.eval_every,
        vision_steps=args.vision_steps,
        device=device,
    )
    base_seconds = time.perf_counter() - start
    lora_seconds, lora_curve = _train_lora(out, args)
    curves["perception LoRA"] = lora_curve
    write_training_report(
        out,
        {
            "options": {
                k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"
            },
            "sizes": asdict(DEMO_SIZES),
            "phases": [asdict(phase) for phase in (MIX_PHASE, FIND_PHASE)],
            "base_seconds": round(base_seconds, 1),
            "lora_seconds": round(lora_seconds, 1),
            "vision_accuracy": vision_accuracy,
            "losses": {name: curve.losses for name, curve in curves.items()},
            "heldout": asdict(heldout),
        },
        curves,
        heldout,
    )
    base_loss = curves[FIND_PHASE.name if args.find_steps else MIX_PHASE.name].smoothed()[-1]
    return (
        f"trained {out} in {base_seconds / 60:.1f} min (loss {base_loss:.3f}) and "
        f"{out / 'perception-lora'} in {lora_seconds / 60:.1f} min; curves in {out / 'training.png'}"
    )


def _train_lora(out: Path, args: argparse.Namespace) -> tuple[float, Curve]:
    from evals.synth import write_dataset
    from train.lora import LoraOptions, train_perception_lora

    start = time.perf_counter()
    data = out / "lora-data"
    rows = write_dataset(
        data,
        args.lora_rows,
        seed=args.seed + 1,
        sizes=list(TRAIN_SIZES),
        objects=OBJECTS,
        object_size=OBJECT_SIZE,
    )
    snap_rows(rows)
    options = LoraOptions(
        steps=args.lora_steps,
        batch_size=8,
        seed=args.seed,
        device=args.device,
        prompt=load_spec(args.spec).prompts.perceive,
    )
    curve = train_perception_lora(out, rows, out / "perception-lora", options)
    shutil.rmtree(data)
    return time.perf_counter() - start, curve
