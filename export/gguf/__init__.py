"""`sparc-engine export gguf`: HF checkpoint (+ perception LoRA) -> a bundle for the llama.cpp runtime.

    bundle/
      manifest.yaml               # files with sha256, quant, preprocessing, token ids, tool versions
      tokenizer.json              # the runtime tokenizes host-side, exactly like the reference runtime
      base/model-<quant>.gguf     # text decoder (llama.cpp's converter, then its quantizer for q4_k_m)
      base/mmproj-<f16|f32>.gguf  # vision tower + merger + DeepStack mergers (libmtmd's projector)
      perception/model-<quant>.gguf   # text decoder with the perception LoRA merged in
      perception/mmproj-...gguf       # only when the LoRA also changes the vision tower

The conversion itself is llama.cpp's `convert_hf_to_gguf.py`, obtained at export time so that it matches
the installed llama-cpp-python (see converter.py); this module picks the family, runs the steps and writes
the manifest.

Perception variant: the LoRA is MERGED with peft into a separate text GGUF, not shipped as a GGUF LoRA
applied at load. Reasons: (1) the reference runtime merges too, so both runtimes compute the same
weights and the parity tests hold; (2) a merged variant is an ordinary GGUF, quantized as a whole
(the LoRA deltas rounded together with the weights they change) and loaded, verified and run exactly
like the base; (3) a llama.cpp adapter is set per context and every decode pays its extra matmuls,
while the merged variant costs nothing at run time.
The price is disk: a second copy of the text weights (the mmproj is shared unless the LoRA touches the
vision tower). The perception stage's KV differs from the base variant's either way, so cross-stage
prefix reuse is lost in both designs.

The converter recognizes a BPE tokenizer by a hash of its output and refuses unknown ones ("BPE
pre-tokenizer was not recognized"), which a re-trained vocabulary such as the tiny test model's always
is. When tokenizer.json splits text with Qwen2's regex, the export runs the converter through
_convert_shim.py, which makes the lookup fall back to llama.cpp's `qwen2` pre-tokenizer (in memory; no
converter file is edited) and records the fallback in the manifest's tools.

The mmproj is kept in f16 (f32 with --quant f32) whatever the text quant: it is small, and quantizing
the vision tower costs grounding accuracy first.

Molmo2 has no llama.cpp converter or libmtmd projector: its bundle is a hybrid (export/gguf/molmo2.py), the
text decoder written directly as a `qwen3` GGUF and the vision and embed graphs as ONNX; a checkpoint
whose text decoder is not plain Qwen3 is refused, and so is --perception-lora for now.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from engine.errors import UserError
from export.gguf import molmo2
from export.gguf.converter import find_converter, llama_cpp_python_version, run_converter
from export.gguf.qwen3vl import QWEN3VL, Qwen3VLGguf
from runtimes.bundle import MANIFEST, Manifest, sha256_file, write_manifest

QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
FAMILIES: dict[str, Qwen3VLGguf] = {arch: family for family in (QWEN3VL,) for arch in family.architectures}
# non-weight files a merged checkpoint needs from its source for the converter (tokenizer, preprocessing)
SIDE_FILES = ("*.json", "*.jinja", "*.txt", "tokenizer.model")


def log(message: str) -> None:
    print(f"[export gguf] {message}", file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def family_for(config: dict, model_dir: Path) -> Qwen3VLGguf:
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in FAMILIES:
        raise UserError(
            f"{model_dir}: {architecture} has no GGUF exporter (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[architecture]


def _adapter_tensor_names(lora_dir: Path) -> list[str] | None:
    path = lora_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as weights:
        return list(weights.keys())


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


def convert_text(llama_dir: Path, model_dir: Path, dest: Path, quant: str, fallback: str | None) -> None:
    if quant in ("f32", "f16", "q8_0"):
        run_converter(llama_dir, model_dir, dest, quant, pre_tokenizer_fallback=fallback)
        return
    # the k-quants are made from a 16-bit GGUF by llama.cpp's own quantizer
    staged = dest.with_suffix(".f16.gguf")
    run_converter(llama_dir, model_dir, staged, "f16", pre_tokenizer_fallback=fallback)
    quantize(staged, dest, quant)
    staged.unlink()


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):  # report what is installed
            found[name] = metadata.version(name)
    return found


def export_gguf(args: argparse.Namespace) -> Path:
    model_dir, out, quant = Path(args.model), Path(args.out), args.quant
    lora = Path(args.perception_lora) if args.perception_lora else None
    config = _read_json(model_dir / "config.json")
    if not config:
        raise UserError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: not one of {', '.join(QUANTS)}")
    if lora is not None and not (lora / "adapter_config.json").is_file():
        raise UserError(f"--perception-lora {lora}: not a PEFT adapter (no adapter_config.json)")
    if (config.get("architectures") or ["?"])[0] == molmo2.ARCHITECTURE:
        return export_molmo2_gguf(model_dir, out, quant, lora, config)
    family = family_for(config, model_dir)  # refuse before any download or conversion
    mmproj_type = "f32" if quant == "f32" else "f16"
    steps = 3 + (1 if lora else 0)

    log(f"[1/{steps}] finding llama.cpp's converter")
    llama_dir, converter_source = find_converter(args.llama_cpp, log)
    fallback = family.pre_tokenizer_fallback(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the bundle is incomplete until the manifest is written last
    for folder in ("base", "perception"):
        shutil.rmtree(out / folder, ignore_errors=True)  # no stale files from an earlier export
        (out / folder).mkdir()

    variants: dict[str, dict[str, str]] = {
        "base": {"text": f"base/model-{quant}.gguf", "mmproj": f"base/mmproj-{mmproj_type}.gguf"}
    }
    log(f"[2/{steps}] text decoder -> {variants['base']['text']}")
    convert_text(llama_dir, model_dir, out / variants["base"]["text"], quant, fallback)
    log(f"[3/{steps}] vision projector -> {variants['base']['mmproj']}")
    run_converter(llama_dir, model_dir, out / variants["base"]["mmproj"], mmproj_type, mmproj=True)

    if lora is not None:
        log(f"[4/{steps}] perception variant: merging {lora} and converting")
        variants["perception"] = {"text": f"perception/model-{quant}.gguf"}
        names = _adapter_tensor_names(lora)
        with tempfile.TemporaryDirectory(prefix="sparc-gguf-merge-") as tmp:
            merged = merge_lora(model_dir, lora, Path(tmp))
            convert_text(llama_dir, merged, out / variants["perception"]["text"], quant, fallback)
            if names is None or family.touches_vision(names):  # unknown adapter layout: assume it does
                variants["perception"]["mmproj"] = f"perception/mmproj-{mmproj_type}.gguf"
                run_converter(
                    llama_dir, merged, out / variants["perception"]["mmproj"], mmproj_type, mmproj=True
                )
    else:
        (out / "perception").rmdir()

    shutil.copy2(model_dir / "tokenizer.json", out / "tokenizer.json")
    files = ["tokenizer.json"] + sorted({path for roles in variants.values() for path in roles.values()})
    from runtimes.torch_ref import checkpoint_image_config  # reads preprocessor_config.json

    tools = {
        **_versions(("sparc-engine", "llama-cpp-python", "torch", "transformers", "peft")),
        "converter": converter_source,
    }
    if fallback:
        tools["pre_tokenizer_fallback"] = fallback
    manifest = Manifest(
        format="gguf",
        architecture=config["architectures"][0],
        source=str(model_dir.resolve()) + (f" + LoRA {lora.resolve()}" if lora else ""),
        dtype=quant,
        image=checkpoint_image_config(model_dir),
        tokens=family.tokens(config, _read_json(model_dir / "generation_config.json")),
        variants=variants,
        files={path: sha256_file(out / path) for path in files},
        tools=tools,
        model={**family.model_sizes(config), "mmproj_dtype": mmproj_type},
    )
    write_manifest(out, manifest)
    log(
        f"done: {out} ({', '.join(variants)}; llama-cpp-python {llama_cpp_python_version() or 'not installed'})"
    )
    return out


def export_molmo2_gguf(model_dir: Path, out: Path, quant: str, lora: Path | None, config: dict) -> Path:
    """The hybrid bundle (export/gguf/molmo2.py): text GGUF for llama.cpp, vision and embed graphs in ONNX."""
    reason = molmo2.refusal(config)
    if reason is None and lora is not None:
        # a merged LoRA may change the vision tower and the embeddings too: a second set of ONNX graphs
        # and its parity tests are not written yet
        reason = "--perception-lora is not supported for Molmo2 yet (export it to ONNX with the LoRA instead)"
    if reason is not None:  # before any work: no output directory appears
        raise UserError(f"{model_dir}: {molmo2.ARCHITECTURE} cannot be exported to GGUF: {reason}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the bundle is incomplete until the manifest is written last
    shutil.rmtree(out / "base", ignore_errors=True)
    (out / "base").mkdir()
    log("[1/3] checking the text decoder: plain Qwen3")
    variants, files, fields = molmo2.export_molmo2(model_dir, out, quant, config, log, quantize)
    tools = _versions(("sparc-engine", "llama-cpp-python", "gguf", "torch", "transformers", "onnx"))
    manifest = Manifest(
        format="gguf",
        architecture=molmo2.ARCHITECTURE,
        source=str(model_dir.resolve()),
        dtype=quant,
        image=fields["image"],
        tokens=fields["tokens"],
        variants=variants,
        files=files,
        tools={**tools, "text_writer": "gguf.GGUFWriter (qwen3)"},
        model=fields["model"],
    )
    write_manifest(out, manifest)
    log(f"done: {out} (text decoder for llama.cpp, vision and embed graphs for onnxruntime)")
    return out
