"""`sparc-engine train perception-lora`: a PEFT LoRA for the perceive stage only (SPARC, section 6).

The adapter learns to answer the family's localization prompt on a low-resolution view with a row's
ground-truth boxes, written the way the family grounds (Qwen3-VL: `bbox_2d` JSON on 0-1000, Molmo2:
`<points>`), so `parse_grounding` reads its output back. It adapts only the text decoder's projections: the
vision tower keeps the base weights, and so does the reason stage (it runs `variant: base`).

Every row with boxes is one example per resolution of `--resolutions` (all of them rather than one cycled
per row, so every row is seen at every view size each epoch). The examples are tokenized and their
pixels prepared once, before the first step, so a bad row fails before any training time is spent; they
stay in memory (Qwen3-VL: about 1.5 MB of float32 pixels per 256 px view, 6 MB per 512 px view).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from engine.batch import Row, read_rows
from engine.boxes import Box
from engine.errors import UserError
from engine.families import Family, family_for
from engine.imaging import load_image
from runtimes.torch_ref.checkpoint import read_json
from runtimes.torch_ref.family import TorchFamily, torch_family_for
from runtimes.torch_ref.runtime import pick_device
from train.examples import TrainingSequence, collate, encode, perceive_segments
from train.loop import Batch, Curve, Schedule, fit, on_device
from train.report import write_training_report

DEFAULT_LABEL = "target"  # label of a box whose row gives no "labels"
TEXT_DECODER = r"(.*\.)?language_model\."  # module-name prefix of the text decoder (Qwen3-VL, Molmo2)
Number = TypeVar("Number", int, float)


@dataclass(frozen=True)
class LoraOptions:
    """What `train perception-lora` takes besides its paths (see its --help)."""

    resolutions: tuple[int | None, ...] = (256, 512)  # perceive-view longest sides in px; None = full
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # examples per step
    lr: float = 1e-3  # peak learning rate
    rank: int = 8  # LoRA rank
    alpha: int = 16  # LoRA scale is alpha / rank
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # text-decoder module names
    seed: int = 0  # LoRA init and batch order: the same seed gives the same adapter on one machine
    device: str = "auto"  # auto | cpu | cuda
    prompt: str | None = None  # the perceive stage's prompt ({question} inside); None: the family's own


@dataclass(frozen=True)
class Examples:
    sequences: list[TrainingSequence]  # one per (row, resolution)
    rows_used: int
    rows_skipped: int  # rows without boxes


def train_perception_lora(model_dir: Path, dataset: Path, out: Path, options: LoraOptions) -> Curve:
    """Fine-tune a perception LoRA on `dataset`'s rows; writes the PEFT adapter, training.json and training.png
    to `out`. Returns the loss curve."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    started = time.perf_counter()
    device = pick_device(options.device)
    family, torch_family = checkpoint_families(model_dir)
    architecture = torch_family.config["architectures"][0]
    prompt = options.prompt or family.perceive_prompt
    examples = load_examples(family, torch_family, read_rows(dataset), options.resolutions, prompt)

    torch.manual_seed(options.seed)  # peft draws the LoRA A matrices from torch's global generator
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        target_modules=text_decoder_pattern(base, options.targets),
        lora_dropout=0.0,  # dropout would draw random numbers every step; the runs are small anyway
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`: noise for a CLI user
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(base, lora).to(device)

    order = batch_order(len(examples.sequences), options.steps, options.batch_size, options.seed)

    def batches(step: int) -> list[Batch]:
        chosen = [examples.sequences[i] for i in order[step]]
        # a family that cannot pad sequences together runs them one per forward; fit adds the gradients
        groups = [chosen] if torch_family.batches_sequences else [[sequence] for sequence in chosen]
        return [on_device(collate(torch_family, group), device) for group in groups]

    # B starts at zero, so step 0 is the base model: a short warmup suffices (from scratch needs more)
    schedule = Schedule(options.steps, options.lr, warmup=max(1, options.steps // 20))
    curve = fit(model, batches, schedule, description="perception lora")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    trainable, total = model.get_nb_trainable_parameters()
    record = {
        "model": str(model_dir),
        "architecture": architecture,
        "dataset": str(dataset),
        "options": asdict(options),
        "warmup_steps": schedule.warmup,
        "rows_used": examples.rows_used,
        "rows_skipped_without_boxes": examples.rows_skipped,
        "examples": len(examples.sequences),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": device,
        "wall_s": round(time.perf_counter() - started, 2),
        "losses": curve.losses,  # mean target-token loss of each step
    }
    write_training_report(out, record, {f"perception LoRA, {architecture}": curve})
    return curve


def checkpoint_families(model_dir: Path) -> tuple[Family, TorchFamily]:
    """The engine's family (prompts, pixels, targets) and the reference runtime's (tokens) of a checkpoint."""
    config = read_json(model_dir / "config.json")
    if not config or not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir}: not a Hugging Face checkpoint (needs config.json, tokenizer.json)")
    torch_family = torch_family_for(config, Tokenizer.from_file(str(model_dir / "tokenizer.json")), model_dir)
    return family_for(config["architectures"][0], torch_family.image_config()), torch_family


def load_examples(
    family: Family,
    torch_family: TorchFamily,
    rows: Sequence[Row],
    resolutions: Sequence[int | None],
    prompt: str,
) -> Examples:
    """Every row with boxes, rendered at every resolution: prompt + grounding target, tokenized."""
    with_boxes = [row for row in rows if row.extra.get("boxes")]
    if not with_boxes:
        raise UserError(f"no row of the dataset has boxes ({len(rows)} rows): nothing to train on")
    sequences = []
    for row in tqdm(with_boxes, desc="prepare", unit="row", file=sys.stderr):
        image = load_image(row.image)
        target = family.grounding_target(row_boxes(row, *image.size))
        for resolution in resolutions:
            view = family.prepare_image(image, resolution, row.id)
            segments = perceive_segments(family, prompt, row.question, view)
            sequences.append(encode(torch_family, segments, target))
    return Examples(sequences, len(with_boxes), len(rows) - len(with_boxes))


def row_boxes(row: Row, width: int, height: int) -> list[Box]:
    """The row's pixel boxes [x1, y1, x2, y2] as normalized Boxes with their labels."""
    boxes = row.extra["boxes"]
    if not isinstance(boxes, list):
        raise UserError(f"row {row.id!r}: boxes must be a list of [x1, y1, x2, y2], got {boxes!r}")
    labels = row.extra.get("labels") or [DEFAULT_LABEL] * len(boxes)
    if not isinstance(labels, list) or len(labels) != len(boxes):
        raise UserError(f"row {row.id!r}: labels must be a list as long as boxes, got {labels!r}")
    normalized = []
    for box, label in zip(boxes, labels):
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(c) for c in box)):
            raise UserError(
                f"row {row.id!r}: a box must be 4 pixel coordinates [x1, y1, x2, y2], got {box!r}"
            )
        x1, y1, x2, y2 = box
        normalized.append(Box.from_corners(x1 / width, y1 / height, x2 / width, y2 / height, str(label)))
    return normalized


def text_decoder_pattern(model: torch.nn.Module, targets: Sequence[str]) -> str:
    """A peft `target_modules` regex matching `targets` inside the text decoder only.

    Vision towers reuse the same names (Molmo2's ViT and pooling have q_proj too), so a bare name list
    would adapt them as well.
    """
    pattern = rf"{TEXT_DECODER}.*\.({'|'.join(re.escape(target) for target in targets)})"
    matched = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if re.fullmatch(pattern, name)}
    missing = [target for target in targets if target not in matched]
    if missing:
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if re.match(TEXT_DECODER, name) and isinstance(module, torch.nn.Linear)
            }
        )
        raise UserError(
            f"--targets: no text-decoder module named {', '.join(missing)} (its linear layers: {', '.join(linear)})"
        )
    return pattern


def batch_order(n_examples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Example indices of each step, (steps, batch_size): a fresh permutation per epoch, so every example
    is seen once an epoch."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // n_examples)
    order = np.concatenate([rng.permutation(n_examples) for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size)


def train_lora_command(args: argparse.Namespace) -> str:
    options = LoraOptions(
        resolutions=parse_resolutions(args.resolutions),
        steps=_positive(args.steps, "--steps"),
        batch_size=_positive(args.batch_size, "--batch-size"),
        lr=_positive(args.lr, "--lr"),
        rank=_positive(args.rank, "--rank"),
        alpha=_positive(args.alpha, "--alpha"),
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        seed=args.seed,
        device=args.device,
        prompt=args.prompt,
    )
    if options.prompt is not None and "{question}" not in options.prompt:
        raise UserError("--prompt must contain the placeholder {question}")
    if not options.targets:
        raise UserError("--targets: name at least one module, e.g. q_proj,v_proj")
    curve = train_perception_lora(args.model, args.dataset, args.out, options)
    record = json.loads((args.out / "training.json").read_text())
    last = curve.losses[-min(10, len(curve.losses)) :]
    return (
        f"{args.out}: perception LoRA for {record['architecture']}, {options.steps} steps on "
        f"{record['rows_used']} rows x {len(options.resolutions)} resolutions "
        f"(skipped without boxes: {record['rows_skipped_without_boxes']}); loss {curve.losses[0]:.3f} -> "
        f"{sum(last) / len(last):.3f} (last {len(last)} steps), {record['wall_s']:.0f} s on {record['device']}"
    )


def parse_resolutions(text: str) -> tuple[int | None, ...]:
    """Read --resolutions: "256,512" -> (256, 512); "full" is the native size (None), as in a spec."""
    resolutions: list[int | None] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "full":
            resolutions.append(None)
        elif part.isdigit() and int(part) >= 32:
            resolutions.append(int(part))
        else:
            raise UserError(
                f"--resolutions: {part!r} is not an integer >= 32 (pixels, longest side) or 'full'"
            )
    return tuple(resolutions)


def _positive(value: Number, flag: str) -> Number:
    if value <= 0:
        raise UserError(f"{flag} must be positive (got {value})")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
