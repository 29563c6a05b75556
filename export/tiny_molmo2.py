"""Tiny random Molmo2 checkpoints of the real architecture, built offline for tests.

`build_tiny_molmo2(out_dir)` writes a directory that loads like a hub checkpoint:

    Molmo2ForConditionalGeneration.from_pretrained(out_dir)   # config.json + model.safetensors
    Qwen2TokenizerFast.from_pretrained(out_dir)               # tokenizer.json + tokenizer_config.json
    preprocessor_config.json, processor_config.json           # Molmo2ImageProcessor / Molmo2Processor

THE WEIGHTS ARE RANDOM AND ITS ANSWERS ARE MEANINGLESS. It exercises every code path of the real
architecture: the SigLIP-style ViT on 378 px crops of 14 px patches (the real crop and patch sizes, so
the engine's preprocessing runs unchanged), the attention-pooling adapter over 2x2 patches fed by two ViT
layers, image features added to the <im_patch> embeddings, the extra-vocabulary embedding rows of the
image tokens, bidirectional attention among image tokens, 1-D RoPE, GQA and per-head q/k norms.

The tokenizer is the tiny Qwen-style BPE of export/tokenizer_offline.py with Molmo2's image tokens added
after the Qwen specials, as in the real vocabulary: the text vocabulary (`vocab_size`, the output rows)
ends where they begin, and they live in the `additional_vocab_size` embedding rows only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import GenerationConfig, Molmo2Config, Molmo2ForConditionalGeneration

from export.tiny import _randomize_
from export.tokenizer_offline import QWEN_SPECIAL_TOKENS, train_tiny_tokenizer

BUILDER_VERSION = 1
COMPLETE_MARKER = "tiny_build.json"  # written last: a directory without it (a killed build) is incomplete

# Molmo2's own tokens, in the order of the real vocabulary (ids 151936... there, right after Qwen's).
MOLMO2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<im_start>",
    "<im_end>",
    "<im_patch>",
    "<im_col>",
    "<low_res_im_start>",
    "<|image|>",  # the placeholder in chat text, replaced by the image's token layout
    "<im_low>",
    "<frame_start>",
    "<frame_end>",
    "<|video|>",
)

# Ours, written after Molmo2's: Qwen-style turns, a user turn's images before its text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<|image|>' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class TinyMolmo2Sizes:
    """Sizes of the tiny Molmo2 (about 0.8M parameters). Values of Molmo2-8B in brackets."""

    vision_layers: int = 2  # [25 built, 24 used]
    vision_hidden: int = 32  # [1152]
    vision_heads: int = 2  # [16]
    vision_head_dim: int = 16  # [72]
    vision_intermediate: int = 64  # [4304]
    # ViT layers whose outputs are concatenated for the adapter (negative: from the end) [(24, 18)... i.e. -3, -9]
    vision_feature_layers: tuple[int, ...] = (-1, 0)
    adapter_intermediate: int = 64  # [12288]
    text_layers: int = 3  # [36]
    text_hidden: int = 128  # [4096]
    text_heads: int = 4  # [32]
    text_kv_heads: int = 2  # [8]
    head_dim: int = 32  # [128]
    text_intermediate: int = 256  # [12288]
    additional_vocab_size: int = 16  # embedding rows for Molmo2's tokens [128]
    rope_theta: float = 1_000_000.0  # [1e6]
    max_position_embeddings: int = 8192  # [36864]
    init_std: float = 0.08  # wide logits, so greedy winners lead by clear margins (see export/tiny.py)
    crop_size: int = 378  # the ViT's square input in pixels, 14 px patches [378]
    # False: no preprocessor_config.json, as in checkpoints that leave the processor to its defaults
    # and state only the vision config (then crop and patch sizes come from there)
    preprocessor_config: bool = True


TINY_MOLMO2 = TinyMolmo2Sizes()


def write_tiny_molmo2_tokenizer(out_dir: Path) -> dict[str, int]:
    """tokenizer.json (+ config files) with Qwen's and Molmo2's special tokens; returns the ids needed."""
    tokenizer = train_tiny_tokenizer()
    text_vocab = tokenizer.get_vocab_size(with_added_tokens=True)  # BPE + Qwen specials
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in MOLMO2_SPECIAL_TOKENS]
    )
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    specials = QWEN_SPECIAL_TOKENS + MOLMO2_SPECIAL_TOKENS
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2TokenizerFast",
            "added_tokens_decoder": {
                str(tokenizer.token_to_id(t)): {"content": t, **entry} for t in specials
            },
            "additional_special_tokens": [t for t in specials if t not in ("<|endoftext|>", "<|im_end|>")],
            "bos_token": None,  # as Qwen3: Molmo2Processor then prepends eos_token (<|im_end|>) as BOS
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "image_token": "<|image|>",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
            "split_special_tokens": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    ids = {t: tokenizer.token_to_id(t) for t in specials}
    return {**ids, "text_vocab_size": text_vocab}


def tiny_molmo2_config(ids: dict[str, int], sizes: TinyMolmo2Sizes = TINY_MOLMO2) -> Molmo2Config:
    text_vocab = ids["text_vocab_size"]
    if ids["<im_start>"] != text_vocab or max(ids[t] for t in MOLMO2_SPECIAL_TOKENS) >= text_vocab + (
        sizes.additional_vocab_size
    ):
        raise ValueError("Molmo2 tokens must fill the additional vocabulary right after the text vocabulary")
    return Molmo2Config(
        vision_config={
            "hidden_size": sizes.vision_hidden,
            "intermediate_size": sizes.vision_intermediate,
            "num_hidden_layers": sizes.vision_layers,
            "num_attention_heads": sizes.vision_heads,
            "num_key_value_heads": sizes.vision_heads,
            "head_dim": sizes.vision_head_dim,
            # the position table has one row per patch of a crop (27 x 27 for the real 378 px crop)
            "image_size": [sizes.crop_size, sizes.crop_size],
            "patch_size": 14,
            "initializer_range": sizes.init_std,
        },
        adapter_config={
            "vision_feature_layer": list(sizes.vision_feature_layers),
            "hidden_size": sizes.vision_hidden,
            "num_attention_heads": sizes.vision_heads,
            "num_key_value_heads": sizes.vision_heads,
            "head_dim": sizes.vision_head_dim,
            "intermediate_size": sizes.adapter_intermediate,
            "text_hidden_size": sizes.text_hidden,
            "initializer_range": sizes.init_std,
        },
        text_config={
            "hidden_size": sizes.text_hidden,
            "num_attention_heads": sizes.text_heads,
            "num_key_value_heads": sizes.text_kv_heads,
            "head_dim": sizes.head_dim,
            "vocab_size": text_vocab,
            "additional_vocab_size": sizes.additional_vocab_size,
            "num_hidden_layers": sizes.text_layers,
            "intermediate_size": sizes.text_intermediate,
            "max_position_embeddings": sizes.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": sizes.rope_theta},
            "qk_norm_type": "qwen3",
            "initializer_range": sizes.init_std,
        },
        image_start_token_id=ids["<im_start>"],
        low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"],
        image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"],
        frame_end_token_id=ids["<frame_end>"],
        tie_word_embeddings=False,
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _processor_files(out: Path, preprocessor_config: bool, crop_size: int) -> None:
    """Molmo2ImageProcessor / Molmo2Processor settings: the released checkpoints' values."""
    if preprocessor_config:
        _write_preprocessor_config(out, crop_size)
    _write_json(
        out / "processor_config.json",
        {
            "processor_class": "Molmo2Processor",
            "image_use_col_tokens": True,
            "use_single_crop_col_tokens": None,
            "use_single_crop_start_token": True,
        },
    )


def _write_preprocessor_config(out: Path, crop_size: int) -> None:
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "Molmo2ImageProcessor",
            "processor_class": "Molmo2Processor",
            "size": {"height": crop_size, "width": crop_size},
            "patch_size": 14,
            "pooling_size": [2, 2],
            "overlap_margins": [4, 4],
            "max_crops": 8,
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
    )


def build_tiny_molmo2(out_dir: str | Path, seed: int = 0, sizes: TinyMolmo2Sizes = TINY_MOLMO2) -> Path:
    """Write a tiny random Molmo2 checkpoint to `out_dir` and return its path (about a second on a CPU)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE_MARKER).unlink(missing_ok=True)
    ids = write_tiny_molmo2_tokenizer(out)
    config = tiny_molmo2_config(ids, sizes)
    with torch.random.fork_rng(devices=[]):  # transformers' init draws from the global RNG
        model = Molmo2ForConditionalGeneration(config).eval()
    _randomize_(model, seed=seed, std=sizes.init_std)
    # Greedy by default: tests want deterministic text. Either stop token ends generation.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|im_end|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out)
    _processor_files(out, sizes.preprocessor_config, sizes.crop_size)
    weights = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    pending = out / (COMPLETE_MARKER + ".tmp")
    _write_json(
        pending, {"builder_version": BUILDER_VERSION, "seed": seed, "model_safetensors_sha256": weights}
    )
    pending.replace(out / COMPLETE_MARKER)
    return out
