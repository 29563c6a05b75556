"""Exporters: Hugging Face checkpoint (+ optional perception LoRA) -> self-describing bundle.

`EXPORTERS` is the one registry the CLI reads: each entry names a format, its help line, a function that
adds its arguments (kept here, torch-free, so `--help` works anywhere) and the module:function that runs
it (imported only when the format is asked for; exporters need the `export` extra: torch, transformers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.commands import Command

# --quant of `export onnx`: the schemes of export/onnx/quantize.py (named here so the CLI needs no onnx)
ONNX_QUANTS = ("int8", "int4", "int8-a8", "int4-a8")
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_k_m")  # --quant of `export gguf`


def _tiny_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same bytes)")


def _checkpoint_arguments(parser: argparse.ArgumentParser, lora_help: str) -> None:
    """What every checkpoint exporter takes: the source, the bundle to write, an optional LoRA."""
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--perception-lora", type=Path, help=lora_help)


def _onnx_arguments(parser: argparse.ArgumentParser) -> None:
    _checkpoint_arguments(parser, "PEFT adapter directory, merged into a 'perception' variant")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="weights and float inputs/outputs of the graphs (fp16: strongly typed, for TensorRT 11)",
    )
    parser.add_argument(
        "--quant",
        choices=ONNX_QUANTS,
        help="quantize the MatMul weights (onnxruntime's MatMulNBits; needs onnxruntime): int8, int4 "
        "multiply in fp32; int8-a8, int4-a8 quantize the activations to int8 on the fly on a CPU, the fast "
        "ones there (README: Quantized ONNX bundles); default: none",
    )


def _gguf_arguments(parser: argparse.ArgumentParser) -> None:
    _checkpoint_arguments(parser, "PEFT adapter merged into a separate 'perception' text GGUF")
    parser.add_argument(
        "--quant",
        choices=GGUF_QUANTS,
        default="f16",
        help="text weights (the vision projector stays f16, f32 with f32); q4_k_m needs llama-cpp-python",
    )
    parser.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="DIR",
        help="llama.cpp checkout whose convert_hf_to_gguf.py to use (default: the installed "
        "llama-cpp-python's own, downloaded once as its sdist)",
    )


def _tensorrt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from", dest="source", type=Path, required=True, metavar="ONNX_BUNDLE", help="ONNX bundle directory"
    )
    parser.add_argument("--out", type=Path, required=True, help="TensorRT bundle directory to write")
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16", "bf16", "fp8", "int8"),
        help="engine precision (default: the ONNX bundle's dtype, the only one TensorRT 11 accepts)",
    )
    parser.add_argument(
        "--spec",
        type=Path,
        help="pipeline spec whose resolutions, rollouts and max_new_tokens size the engines' shapes "
        "(default: the numbers of specs/qwen3vl-sparc-wbf8.yaml)",
    )


EXPORTERS: dict[str, Command] = {
    "tiny": Command(
        "build a tiny random Qwen3-VL checkpoint of the real architecture (tests, demo; answers meaningless)",
        _tiny_arguments,
        "export.tiny:export_tiny",
    ),
    "onnx": Command(
        "export a checkpoint (+ perception LoRA) to an ONNX bundle: vision, embed and decoder graphs",
        _onnx_arguments,
        "export.onnx:export_onnx",
    ),
    "gguf": Command(
        "HF checkpoint (Qwen3-VL) -> GGUF bundle for the llamacpp runtime: text GGUF + vision projector",
        _gguf_arguments,
        "export.gguf:export_gguf",
    ),
    "tensorrt": Command(
        "build TensorRT engines from an ONNX bundle, on the target device (needs [tensorrt] and its GPU)",
        _tensorrt_arguments,
        "export.tensorrt:export_tensorrt",
    ),
}
