"""What a GGUF exporter must do for one model family, the registry of families, and what they share.

A family is one subclass filed under the Hugging Face `architectures` names it serves
(runtimes/registry.py): Qwen3-VL goes through llama.cpp's own converter (export/gguf/qwen3vl.py),
Molmo2 is written as a hybrid bundle (export/gguf/molmo2.py). The format driver (export/gguf/__init__.py)
checks the arguments and hands the checkpoint to its family.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from engine.errors import UserError
from runtimes.registry import Registered, Registry

# non-weight files a merged checkpoint needs from its source for the converter (tokenizer, preprocessing)
SIDE_FILES = ("*.json", "*.jinja", "*.txt", "tokenizer.model")


@dataclass(frozen=True)
class GgufJob:
    """One `export gguf` call, its arguments checked."""

    model_dir: Path
    out: Path
    quant: str
    lora: Path | None  # a PEFT perception adapter
    config: dict  # the checkpoint's config.json
    llama_cpp: Path | None  # a llama.cpp checkout whose converter to use (None: the matching release's)


class GgufFamily(Registered, ABC):
    registry = Registry("GGUF export")

    @abstractmethod
    def export(self, job: GgufJob) -> Path:
        """Write the bundle (the perception variant too when the job has a LoRA); returns its folder."""


def log(message: str) -> None:
    print(f"[export gguf] {message}", file=sys.stderr, flush=True)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def merge_lora(model_dir: Path, lora_dir: Path, out: Path) -> Path:
    """Write the checkpoint with the PEFT adapter merged into its weights (float32, as the reference runtime)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, lora_dir).merge_and_unload()
    model.save_pretrained(out)
    for pattern in SIDE_FILES:
        for path in model_dir.glob(pattern):
            if not (out / path.name).exists():
                shutil.copy2(path, out / path.name)
    return out


def quantize(source: Path, dest: Path, quant: str) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (through llama-cpp-python)."""
    try:
        import llama_cpp

        from runtimes.llamacpp import quiet_llama_logs
    except ImportError as error:
        raise UserError(
            f"--quant {quant} needs llama-cpp-python: pip install 'sparc-engine[llama]'"
        ) from error
    quiet_llama_logs()  # progress comes from our steps, not from a line per tensor
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params) != 0:
        raise UserError(f"llama.cpp could not quantize {source.name} to {quant}")


def versions(names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):  # report what is installed
            found[name] = metadata.version(name)
    return found
