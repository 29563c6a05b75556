"""Supervised fine-tuning with the engine's own prompts and numpy pixels: the perception LoRA, the demo model.

`TRAINERS` is what the CLI reads (arguments here, torch-free; the trainers need the `export` extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.commands import Command


def _lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory")
    parser.add_argument(
        "--dataset",
        type=Path,
        required=True,
        metavar="ROWS.jsonl",
        help='rows {"image", "question", "boxes"}',
    )
    parser.add_argument("--out", type=Path, required=True, help="adapter directory to write (PEFT)")
    parser.add_argument(
        "--resolutions",
        default="256,512",
        help="perceive-view resolutions to train at, every row at each (the paper: several beat native)",
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (LoRA weights only)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank: higher fits more, costs more")
    parser.add_argument("--alpha", type=int, default=16, help="LoRA scaling numerator (scale = alpha/rank)")
    parser.add_argument(
        "--targets",
        default="q_proj,k_proj,v_proj,o_proj",
        help="module names of the text decoder to adapt (comma-separated)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--prompt",
        help="the perceive prompt your spec runs (its prompts.perceive, with {question}); default: the family's",
    )


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, help="checkpoint directory; the LoRA goes to OUT/perception-lora"
    )
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same checkpoint")
    parser.add_argument(
        "--steps",
        type=int,
        default=1600,
        help="optimizer steps of the first (mixed) phase: 16 sequences each, a 17th every fourth step",
    )
    parser.add_argument(
        "--lr", type=float, default=3e-3, help="peak learning rate of the first (mixed) phase"
    )
    parser.add_argument(
        "--find-steps",
        type=int,
        default=800,
        help="steps of the last phase: mostly localization among distractors, the target found by its colour",
    )
    parser.add_argument("--find-lr", type=float, default=1e-3, help="peak learning rate of the last phase")
    parser.add_argument(
        "--vision-steps",
        type=int,
        default=3000,
        help="steps of stage 0, the vision tower alone on dense token labels, before the whole model",
    )
    parser.add_argument(
        "--spec",
        type=Path,
        default=Path("specs/demo/sparc-wbf8.yaml"),
        help="the spec whose crop stage the reason stage is trained on (train with the crops you run)",
    )
    parser.add_argument("--lora-steps", type=int, default=300, help="optimizer steps of the perception LoRA")
    parser.add_argument("--lora-rows", type=int, default=400, help="synthetic rows the LoRA trains on")
    parser.add_argument("--save-every", type=int, default=500, help="save the weights every N steps")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=100,
        help="score the held-out probes (the answer-carrying token's loss per task, against chance) every N steps",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="where to train (cpu: the reproducible default; cuda: many more steps in the same time)",
    )


TRAINERS: dict[str, Command] = {
    "perception-lora": Command(
        "fine-tune a PEFT LoRA for the perceive stage on rows with ground-truth boxes (SPARC section 6)",
        _lora_arguments,
        "train.lora:train_lora_command",
    ),
    "demo": Command(
        "train the demo model from scratch on synthetic shapes (a small Qwen3-VL), then its perception LoRA",
        _demo_arguments,
        "train.demo:train_demo_command",
    ),
}
