"""Qwen3-VL to GGUF through llama.cpp's own converter: a text GGUF and libmtmd's vision projector.

llama.cpp's converter handles the architecture itself (`Qwen3VLTextModel` for the text GGUF,
`Qwen3VLVisionModel` with `--mmproj` for the vision projector, DeepStack included); what is left here is
running its steps and what a checkpoint's files tell us and the converter does not: the pre-tokenizer
fallback, the token ids the runtime needs, whether a LoRA touches the vision tensors.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from export.gguf.base import GgufFamily, GgufJob, log, merge_lora, quantize, read_json, versions
from export.gguf.converter import find_converter, llama_cpp_python_version, run_converter
from export.tokenizer_offline import QWEN2_SPLIT_REGEX
from runtimes.bundle import MANIFEST, Manifest, sha256_file, write_manifest
from runtimes.torch_ref.checkpoint import checkpoint_image_config


class Qwen3VLGguf(GgufFamily):
    architectures = ("Qwen3VLForConditionalGeneration",)
    # llama.cpp's name for the pre-tokenizer of every Qwen2-derived tokenizer (same split regex)
    pre_tokenizer = "qwen2"
    vision_prefix = "visual."  # checkpoint / adapter tensor names of the vision tower

    def export(self, job: GgufJob) -> Path:
        model_dir, out, quant, lora, config = job.model_dir, job.out, job.quant, job.lora, job.config
        mmproj_type = "f32" if quant == "f32" else "f16"
        steps = 3 + (1 if lora else 0)

        log(f"[1/{steps}] finding llama.cpp's converter")
        llama_dir, converter_source = find_converter(job.llama_cpp, log)
        fallback = self.pre_tokenizer_fallback(model_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(
            missing_ok=True
        )  # the bundle is incomplete until the manifest is written last
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
            names = adapter_tensor_names(lora)
            with tempfile.TemporaryDirectory(prefix="sparc-gguf-merge-") as tmp:
                merged = merge_lora(model_dir, lora, Path(tmp))
                convert_text(llama_dir, merged, out / variants["perception"]["text"], quant, fallback)
                if names is None or self.touches_vision(names):  # unknown adapter layout: assume it does
                    variants["perception"]["mmproj"] = f"perception/mmproj-{mmproj_type}.gguf"
                    run_converter(
                        llama_dir, merged, out / variants["perception"]["mmproj"], mmproj_type, mmproj=True
                    )
        else:
            (out / "perception").rmdir()

        shutil.copy2(model_dir / "tokenizer.json", out / "tokenizer.json")
        files = ["tokenizer.json"] + sorted({path for roles in variants.values() for path in roles.values()})

        tools = {
            **versions(("sparc-engine", "llama-cpp-python", "torch", "transformers", "peft")),
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
            tokens=self.tokens(config, read_json(model_dir / "generation_config.json")),
            variants=variants,
            files={path: sha256_file(out / path) for path in files},
            tools=tools,
            model={**self.model_sizes(config), "mmproj_dtype": mmproj_type},
        )
        write_manifest(out, manifest)
        log(
            f"done: {out} ({', '.join(variants)}; llama-cpp-python {llama_cpp_python_version() or 'not installed'})"
        )
        return out

    def pre_tokenizer_fallback(self, model_dir: Path) -> str | None:
        """`qwen2` when tokenizer.json splits text with Qwen2's regex, else None (let the converter fail).

        The converter recognizes the real checkpoints' tokenizers by a hash of their output on a test
        string; a re-trained vocabulary (the tiny test model's) changes that hash but not the splitting
        rule, which is all llama.cpp's pre-tokenizer name stands for. A different regex gets no fallback.
        """
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            return None
        pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [pre])
        regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
        return self.pre_tokenizer if regexes == [QWEN2_SPLIT_REGEX] else None

    def tokens(self, config: dict, generation_config: dict) -> dict[str, int | list[int]]:
        eos = generation_config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))
        eos = eos if isinstance(eos, list) else [eos]
        return {
            "image_token_id": config["image_token_id"],
            "video_token_id": config["video_token_id"],
            "vision_start_token_id": config["vision_start_token_id"],
            "vision_end_token_id": config["vision_end_token_id"],
            "eos_token_ids": sorted({int(e) for e in eos if e is not None}),
        }

    def model_sizes(self, config: dict) -> dict[str, int]:
        text, vision = config.get("text_config", {}), config.get("vision_config", {})
        return {
            "text_layers": text.get("num_hidden_layers"),
            "text_hidden": text.get("hidden_size"),
            "vocab_size": text.get("vocab_size"),
            "max_position_embeddings": text.get("max_position_embeddings"),
            "merge_size": vision.get("spatial_merge_size"),
            "deepstack_layers": len(vision.get("deepstack_visual_indexes", [])),
        }

    def touches_vision(self, tensor_names: list[str]) -> bool:
        """Whether a LoRA adapter with these tensor names changes the vision tower (then it needs its own mmproj)."""
        return any(self.vision_prefix in name for name in tensor_names)


def adapter_tensor_names(lora_dir: Path) -> list[str] | None:
    path = lora_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as weights:
        return list(weights.keys())


def convert_text(llama_dir: Path, model_dir: Path, dest: Path, quant: str, fallback: str | None) -> None:
    if quant in ("f32", "f16", "q8_0"):
        run_converter(llama_dir, model_dir, dest, quant, pre_tokenizer_fallback=fallback)
        return
    # the k-quants are made from a 16-bit GGUF by llama.cpp's own quantizer
    staged = dest.with_suffix(".f16.gguf")
    run_converter(llama_dir, model_dir, staged, "f16", pre_tokenizer_fallback=fallback)
    quantize(staged, dest, quant)
    staged.unlink()
