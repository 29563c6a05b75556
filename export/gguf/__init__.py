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
from pathlib import Path

from engine.errors import UserError
from export.gguf import molmo2, qwen3vl  # noqa: F401  (each registers itself)
from export.gguf.base import GgufFamily, GgufJob, read_json
from runtimes.registry import architecture_of

QUANTS = ("f32", "f16", "q8_0", "q4_k_m")


def export_gguf(args: argparse.Namespace) -> Path:
    model_dir, out, quant = Path(args.model), Path(args.out), args.quant
    lora = Path(args.perception_lora) if args.perception_lora else None
    config = read_json(model_dir / "config.json")
    if not config:
        raise UserError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: not one of {', '.join(QUANTS)}")
    if lora is not None and not (lora / "adapter_config.json").is_file():
        raise UserError(f"--perception-lora {lora}: not a PEFT adapter (no adapter_config.json)")
    family = GgufFamily.registry.lookup(architecture_of(config))()  # refuse before any download or conversion
    llama_cpp = Path(args.llama_cpp) if args.llama_cpp else None
    return family.export(GgufJob(model_dir, out, quant, lora, config, llama_cpp))
