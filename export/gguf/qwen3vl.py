"""Qwen3-VL's GGUF specifics: its pre-tokenizer fallback, the token ids the runtime needs, its vision tensors.

llama.cpp's converter handles the architecture itself (`Qwen3VLTextModel` for the text GGUF,
`Qwen3VLVisionModel` with `--mmproj` for the vision projector, DeepStack included); what is left here is
what a checkpoint's files tell us and the converter does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from export.tokenizer_offline import QWEN2_SPLIT_REGEX


@dataclass(frozen=True)
class Qwen3VLGguf:
    architectures: tuple[str, ...] = ("Qwen3VLForConditionalGeneration",)
    # llama.cpp's name for the pre-tokenizer of every Qwen2-derived tokenizer (same split regex)
    pre_tokenizer: str = "qwen2"
    vision_prefix: str = "visual."  # checkpoint / adapter tensor names of the vision tower

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


QWEN3VL = Qwen3VLGguf()
