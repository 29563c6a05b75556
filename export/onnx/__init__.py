"""`sparc-engine export onnx`: Hugging Face checkpoint (+ perception LoRA) -> ONNX bundle.

    bundle/
      manifest.yaml          # written last: a bundle with a manifest is complete
      tokenizer.json
      base/<role>.onnx       # the family's graphs, e.g. vision, embed, decoder
      perception/<role>.onnx # only the graphs the merged LoRA changes (typically the decoder)

The family (export/onnx/<family>.py, picked by the checkpoint's `architectures`) says which graphs exist,
how to build them, and what the manifest's `image`, `tokens` and `model` sections hold; this driver exports
them with the TorchScript exporter, merges the LoRA, and writes the manifest with every file's sha256.

--dtype fp16 casts the model before tracing, so the graphs are typed fp16 end to end (TensorRT 11 builds
only strongly typed networks): every float input and output (pixel_values, interp_weights,
inputs_embeds, deepstack_embeds, past/present KV, image_embeds, logits) is float16; ids, positions and
masks stay int64. Norms and softmax still upcast to float32 inside, as transformers does.

--quant int8|int4 then rewrites the written graphs with weight-only quantized MatMuls (export/onnx/quantize.py);
the manifest's dtype stays fp32 (the graphs' inputs and outputs) and model.quant records what was quantized.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from export.onnx import molmo2, qwen3vl  # noqa: F401  (registers the families)
from export.onnx.base import Graph, OnnxFamily
from runtimes.bundle import MANIFEST, Manifest, sha256_file, write_manifest
from runtimes.protocol import RuntimeInputError
from runtimes.registry import architecture_of

if TYPE_CHECKING:
    import onnx

OPSET = 17
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def export_onnx(args: argparse.Namespace) -> Path:
    model_dir, out = Path(args.model), Path(args.out)
    lora = Path(args.perception_lora) if args.perception_lora else None
    config = _read_json(model_dir / "config.json")
    if not config or not (model_dir / "tokenizer.json").is_file():
        raise RuntimeInputError(
            f"{model_dir}: not a Hugging Face checkpoint (needs config.json, tokenizer.json)"
        )
    architecture = architecture_of(config)
    family_class = OnnxFamily.registry.lookup(architecture)
    if lora and not (lora / "adapter_config.json").is_file():
        raise RuntimeInputError(f"--perception-lora {lora}: not a PEFT adapter (no adapter_config.json)")
    if args.quant and args.dtype != "fp32":
        raise RuntimeInputError(f"--quant {args.quant} quantizes fp32 weights: use it with --dtype fp32")
    family = family_class(config, model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the bundle is incomplete until the manifest is rewritten

    steps = [
        *family.roles,
        *(["perception"] if lora else []),
        *(["quantize"] if args.quant else []),
        "manifest",
    ]
    with tqdm(total=len(steps), desc="export onnx", unit="step", file=sys.stderr) as progress:
        base = _load(model_dir, DTYPES[args.dtype])
        variants: dict[str, dict[str, str]] = {"base": {}}
        for role in family.roles:
            progress.set_postfix_str(f"base/{role}")
            variants["base"][role] = _export_graph(family.graph(base, role), out, f"base/{role}.onnx")
            progress.update()
        if lora:
            progress.set_postfix_str("perception")
            variants["perception"] = _export_perception(
                family, base, model_dir, lora, DTYPES[args.dtype], out
            )
            progress.update()
        quant = None
        if args.quant:
            from export.onnx.quantize import quantize_graphs

            progress.set_postfix_str(f"quantize {args.quant}")
            quant = quantize_graphs(
                out, [f for roles in variants.values() for f in roles.values()], args.quant
            )
            progress.update()
        progress.set_postfix_str("manifest")
        shutil.copyfile(model_dir / "tokenizer.json", out / "tokenizer.json")
        manifest = Manifest(
            format="onnx",
            architecture=architecture,
            source=str(model_dir),
            dtype=args.dtype,
            image=family.image_config(),
            tokens={**family.tokens(), "eos_token_ids": _eos_ids(model_dir, config)},
            variants=variants,
            files=_checksums(out, variants),
            tools=_versions("torch", "transformers", "onnx", "onnxruntime", "peft"),
            model={
                **family.sizes(),
                "opset": OPSET,
                "perception_lora": str(lora) if lora else None,
                "quant": asdict(quant) if quant else None,  # dtype stays the graphs' float inputs/outputs
            },
        )
        write_manifest(out, manifest)
        progress.update()
    return out


def _load(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    # eager attention: plain matmul/softmax with our explicit mask, which every ONNX backend runs
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return model.eval()


def _export_perception(
    family: OnnxFamily, base: torch.nn.Module, model_dir: Path, lora: Path, dtype: torch.dtype, out: Path
) -> dict[str, str]:
    """Merge the LoRA with peft and export only the graphs whose weights it changes."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(_load(model_dir, dtype), lora).merge_and_unload().eval()
    before, after = base.state_dict(), merged.state_dict()
    if before.keys() != after.keys():
        raise RuntimeInputError(f"{lora}: the merged model has other parameters than the base (not a LoRA?)")
    changed = {family.role_of(name) for name in before if not torch.equal(before[name], after[name])}
    if not changed:
        raise RuntimeInputError(f"{lora}: merging the adapter changes no weight (an untrained LoRA?)")
    return {
        role: _export_graph(family.graph(merged, role), out, f"perception/{role}.onnx")
        for role in family.roles
        if role in changed
    }


def _export_graph(graph: Graph, out: Path, relative: str) -> str:
    path = out / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as scratch, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about tracing and its own deprecation; the parity tests are the check.
        warnings.simplefilter("ignore")
        traced = Path(scratch) / path.name
        torch.onnx.export(
            graph.module,
            graph.inputs,
            str(traced),
            input_names=graph.input_names,
            output_names=graph.output_names,
            dynamic_axes=graph.dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
        for stale in path.parent.glob(path.name + "*"):
            stale.unlink()
        if len(list(Path(scratch).iterdir())) == 1:
            traced.replace(path)
        else:
            gather_external_data(traced, path)
    return relative


def gather_external_data(source: Path, path: Path) -> None:
    """Re-save a graph whose weights are spread over one file per tensor (what the TorchScript exporter
    writes past protobuf's 2 GB limit) as `path` plus a single `<name>.data`, which the manifest lists."""
    import onnx

    save_graph(onnx.load(str(source)), path, external=True)


def save_graph(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Write a graph to `path`; with `external`, its weights go to one `<name>.data` beside it."""
    import onnx

    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
    )


def _versions(*names: str) -> dict[str, str]:
    """Installed versions of the export tools (onnxruntime, say, is not needed to export)."""
    found = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _eos_ids(model_dir: Path, config: dict) -> list[int]:
    eos = _read_json(model_dir / "generation_config.json").get("eos_token_id")
    eos = eos if eos is not None else config.get("text_config", {}).get("eos_token_id")
    return sorted(set(eos if isinstance(eos, list) else [eos]) - {None})


def _checksums(out: Path, variants: dict[str, dict[str, str]]) -> dict[str, str]:
    """sha256 of the tokenizer and every graph, with any external-data file a graph was written with."""
    files = ["tokenizer.json"]
    for roles in variants.values():
        for relative in roles.values():
            files.append(relative)
            files += sorted(
                str(p.relative_to(out)) for p in (out / relative).parent.glob(Path(relative).name + ".*")
            )
    return {relative: sha256_file(out / relative) for relative in files}
