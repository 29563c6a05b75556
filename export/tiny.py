"""Tiny random Qwen3-VL checkpoints of the real architecture, built offline for tests and `make demo`.

`build_tiny_qwen3vl(out_dir)` writes a directory that loads like a hub checkpoint:

    Qwen3VLForConditionalGeneration.from_pretrained(out_dir)   # config.json + model.safetensors
    Qwen2TokenizerFast.from_pretrained(out_dir)                # tokenizer.json + tokenizer_config.json
    Qwen2VLImageProcessor.from_pretrained(out_dir)             # preprocessor_config.json
    tiny_processor(out_dir)                                    # a Qwen3VLProcessor, without torchvision

THE WEIGHTS ARE RANDOM AND ITS ANSWERS ARE MEANINGLESS. The model exists to exercise every code path of
the real architecture (vision tower, 2x2 merger, DeepStack, interleaved M-RoPE, GQA, q/k norms) in seconds
on a CPU. Every tensor, biases and norm scales included, is drawn at random, so an exporter or runtime that
drops, transposes or mis-scales one of them changes the logits and fails a comparison against transformers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2TokenizerFast,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from export.tokenizer_offline import SpecialIds, write_tiny_tokenizer

# Bump when the builder's output changes, so cached directories from an older builder are rebuilt.
BUILDER_VERSION = 1
# Written last: a directory without it (a killed build) is never reused.
COMPLETE_MARKER = "tiny_build.json"


@dataclass(frozen=True)
class TinyQwen3VLSizes:
    """Sizes of the tiny Qwen3-VL (about 1M parameters). Values of the real 4B model in brackets."""

    # Vision tower
    vision_depth: int = 2  # ViT blocks [24]
    vision_hidden: int = 64  # [1024]
    vision_heads: int = 2  # head_dim 32
    vision_intermediate: int = 128
    patch_size: int = 16  # pixels per patch side [16]
    spatial_merge_size: int = 2  # 2x2 patches -> one LLM token, i.e. one token per 32x32 px [2]
    temporal_patch_size: int = 2  # an image is its frame repeated twice [2]
    num_position_embeddings: int = 64  # learned 8x8 grid, bilinearly resampled to each image [2304 = 48x48]
    # ViT blocks whose merged outputs are added to the first LLM layers. Must stay below text_layers:
    # llama.cpp aborts (GGML_ASSERT ggml_can_repeat) when the two counts are equal. [(5, 11, 17)]
    deepstack_visual_indexes: tuple[int, ...] = (0,)
    # Text decoder
    text_layers: int = 3  # [36]
    text_hidden: int = 128  # also the vision merger's output size [2560]
    text_heads: int = 4  # [32]
    text_kv_heads: int = 2  # grouped-query attention, 2 query heads per KV head [8]
    head_dim: int = 32  # [128]; text_heads x head_dim may differ from text_hidden (4B: 4096 on 2560)
    text_intermediate: int = 256
    # Interleaved M-RoPE: rotary frequency pairs given to (t, h, w); sums to head_dim / 2 [(24, 20, 20)]
    mrope_section: tuple[int, int, int] = (6, 5, 5)
    rope_theta: float = 5_000_000.0  # [5e6]
    max_position_embeddings: int = 4096
    vocab_multiple: int = 64  # embedding rows = tokenizer size rounded up to this
    max_pixels: int = 16_777_216  # pixel area the image processor resizes down to at most [16_777_216]
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # pixels become (x / 255 - mean) / std [0.5]
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)  # [0.5]
    # Standard deviation of the random init. Larger than the usual 0.02 so logits spread wide (std ~0.9)
    # and greedy winners lead by absolute margins (>= ~4e-3 on the test prompt) well above the ~3e-4
    # rounding differences between runtimes; the test checks the margin stays above 1e-3.
    init_std: float = 0.08

    def __post_init__(self) -> None:
        problems = []
        if self.text_heads % self.text_kv_heads:
            problems.append("text_heads must be a multiple of text_kv_heads")
        if sum(self.mrope_section) * 2 != self.head_dim:
            problems.append("mrope_section must sum to head_dim / 2")
        if math.isqrt(self.num_position_embeddings) ** 2 != self.num_position_embeddings:
            problems.append("num_position_embeddings must be a perfect square (a square learned grid)")
        if len(self.deepstack_visual_indexes) >= self.text_layers:
            problems.append("need fewer deepstack indexes than text layers (llama.cpp asserts otherwise)")
        if any(not 0 <= i < self.vision_depth for i in self.deepstack_visual_indexes):
            problems.append("deepstack_visual_indexes must name vision blocks")
        if (self.vision_hidden // self.vision_heads) % 4:
            problems.append("vision head_dim must be divisible by 4 (2-D axial rotary)")
        if problems:
            raise ValueError("invalid TinyQwen3VLSizes: " + "; ".join(problems))


TINY_QWEN3VL = TinyQwen3VLSizes()


def tiny_qwen3vl_config(ids: SpecialIds, sizes: TinyQwen3VLSizes = TINY_QWEN3VL) -> Qwen3VLConfig:
    """The Qwen3VLConfig of the tiny model, with token ids taken from the tiny tokenizer."""
    vocab_size = -(-ids.vocab_size // sizes.vocab_multiple) * sizes.vocab_multiple  # round up
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": sizes.text_hidden,
        "intermediate_size": sizes.text_intermediate,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": sizes.text_heads,
        "num_key_value_heads": sizes.text_kv_heads,
        "head_dim": sizes.head_dim,
        "max_position_embeddings": sizes.max_position_embeddings,
        "initializer_range": sizes.init_std,
        # transformers 5 spells this `rope_parameters` (theta inside); an old-style `rope_scaling` without
        # `rope_theta` would silently get the class default theta of 5e5 instead of Qwen's 5e6.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": sizes.rope_theta,
            "mrope_section": list(sizes.mrope_section),
            "mrope_interleaved": True,
        },
        "bos_token_id": ids.endoftext,  # as in the real text_config; no BOS is ever prepended
        "eos_token_id": ids.im_end,
        "pad_token_id": ids.endoftext,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    vision_config = {
        "depth": sizes.vision_depth,
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": sizes.vision_intermediate,
        "num_heads": sizes.vision_heads,
        "patch_size": sizes.patch_size,
        "spatial_merge_size": sizes.spatial_merge_size,
        "temporal_patch_size": sizes.temporal_patch_size,
        "out_hidden_size": sizes.text_hidden,  # merged image tokens replace text embeddings
        "num_position_embeddings": sizes.num_position_embeddings,
        "deepstack_visual_indexes": list(sizes.deepstack_visual_indexes),
        "initializer_range": sizes.init_std,
    }
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids.image_pad,
        video_token_id=ids.video_pad,
        vision_start_token_id=ids.vision_start,
        vision_end_token_id=ids.vision_end,
        tie_word_embeddings=False,
        dtype="float32",
    )


def _randomize_(model: torch.nn.Module, *, seed: int, std: float) -> None:
    """Overwrite every parameter from one seeded generator, in sorted name order.

    transformers' own init depends on the global RNG and on its version's init code; drawing everything
    here makes the bytes depend only on (seed, sizes, torch's normal sampler).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            is_norm_scale = param.ndim == 1 and "norm" in name and name.endswith(".weight")
            if is_norm_scale:
                # Scales near 1 keep the activations sane but still differ per channel.
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)


def _silence_padding_rows_(model: Qwen3VLForConditionalGeneration, tokenizer_size: int) -> None:
    """Zero the embedding and output rows of ids past the tokenizer (the vocab is padded to a multiple of 64).

    Like the real checkpoint, the model has more rows than the tokenizer has tokens. Random rows there
    would let the tiny model emit ids no tokenizer can decode; a zero output row gives logit 0, far below
    the top of ~1000 random logits (std ~1), so greedy decoding never picks one. Sampling can, rarely, as
    (in principle) with the real model: runtimes must tolerate such ids.
    """
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer_size:] = 0.0
        model.get_output_embeddings().weight[tokenizer_size:] = 0.0


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _image_processor_config(sizes: TinyQwen3VLSizes) -> dict:
    """Qwen2VLImageProcessor settings (Qwen3-VL reuses it with patch 16)."""
    token_px = sizes.patch_size * sizes.spatial_merge_size  # 32: one LLM token covers 32x32 px
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": list(sizes.image_mean),
        "image_std": list(sizes.image_std),
        # PIXEL AREAS, not edge lengths (transformers' naming): images are resized, keeping their aspect,
        # to sides that are multiples of 32 px with an area in [32*32, 4096*4096]. The real checkpoint's
        # minimum upscales small images; this one leaves them as they are (down to one token).
        "size": {"shortest_edge": token_px * token_px, "longest_edge": sizes.max_pixels},
        "patch_size": sizes.patch_size,
        "temporal_patch_size": sizes.temporal_patch_size,
        "merge_size": sizes.spatial_merge_size,
    }


def build_tiny_qwen3vl(out_dir: str | Path, *, seed: int = 0, sizes: TinyQwen3VLSizes = TINY_QWEN3VL) -> Path:
    """Write a tiny random Qwen3-VL checkpoint to `out_dir` and return its path.

    The same seed (and builder version) gives byte-identical `model.safetensors`. Random weights: the
    model's answers are meaningless. Takes about 0.2 s on a CPU once transformers is imported.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE_MARKER).unlink(missing_ok=True)

    ids = write_tiny_tokenizer(out)
    config = tiny_qwen3vl_config(ids, sizes)
    # transformers' init draws from the global RNG before we overwrite everything; keep the caller's RNG
    # state untouched so building a model inside a test does not change that test's random numbers.
    with torch.random.fork_rng(devices=[]):
        model = Qwen3VLForConditionalGeneration(config).eval()
    _randomize_(model, seed=seed, std=sizes.init_std)
    _silence_padding_rows_(model, ids.vocab_size)
    # Greedy by default (unlike the real checkpoint's sampling defaults): tests want deterministic text.
    # Either stop token ends generation, as with the real checkpoint.
    model.generation_config = GenerationConfig(
        bos_token_id=ids.endoftext,
        eos_token_id=[ids.im_end, ids.endoftext],
        pad_token_id=ids.endoftext,
        do_sample=False,
    )
    model.save_pretrained(out)  # config.json, generation_config.json, model.safetensors (float32)
    _write_json(out / "preprocessor_config.json", _image_processor_config(sizes))

    # Last: a record of what was built, whose presence marks the directory as complete. Written to a
    # temporary name and renamed, so a kill mid-write never leaves a half-written marker behind.
    weights_sha256 = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    pending = out / (COMPLETE_MARKER + ".tmp")
    _write_json(pending, {**_build_key(seed, sizes), "model_safetensors_sha256": weights_sha256})
    pending.replace(out / COMPLETE_MARKER)
    return out


def _build_key(seed: int, sizes: TinyQwen3VLSizes) -> dict:
    return {"builder_version": BUILDER_VERSION, "seed": seed, "sizes": json.loads(json.dumps(asdict(sizes)))}


def is_complete_build(out: Path, seed: int, sizes: TinyQwen3VLSizes = TINY_QWEN3VL) -> bool:
    """True when `out` holds a finished build by this builder version with this seed and sizes."""
    marker = out / COMPLETE_MARKER
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text(encoding="utf-8"))
    return {k: recorded.get(k) for k in ("builder_version", "seed", "sizes")} == _build_key(seed, sizes)


def build_tiny_qwen3vl_cached(
    root: str | Path, seed: int = 0, sizes: TinyQwen3VLSizes = TINY_QWEN3VL
) -> Path:
    """Return `root/tiny-qwen3vl-seed{seed}`, building it only if no complete, matching build is there.

    A directory is reused only when its marker (written last) exists and records the same builder version,
    seed and sizes; anything else (a killed build, an older builder) is deleted and rebuilt. Not safe
    against two processes building the same directory at once.
    """
    out = Path(root) / f"tiny-qwen3vl-seed{seed}"
    if is_complete_build(out, seed, sizes):
        return out
    if out.exists():
        shutil.rmtree(out)
    return build_tiny_qwen3vl(out, seed=seed, sizes=sizes)


class _ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without a video processor.

    Every transformers video processor needs torchvision, which CPU-only installs lack, and the
    base class type-checks each sub-processor. This subclass lets `video_processor` be None; images and
    text work as usual, and passing videos fails.
    """

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def tiny_processor(out_dir: str | Path) -> Qwen3VLProcessor:
    """A Qwen3VLProcessor (images + text, no videos) for a directory written by `build_tiny_qwen3vl`.

    `AutoProcessor.from_pretrained(out_dir)` cannot be used without torchvision: it resolves to
    Qwen3VLProcessor, whose video processor raises ImportError (checked with transformers 5.23).
    """
    # Imported here: without torchvision, resolving this name logs a fallback warning (to the PIL
    # implementation), which should not appear on every `import export.tiny`.
    from transformers import Qwen2VLImageProcessor

    out = Path(out_dir)
    return _ImageOnlyQwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor.from_pretrained(out),
        tokenizer=Qwen2TokenizerFast.from_pretrained(out),
        video_processor=None,
        chat_template=(out / "chat_template.jinja").read_text(encoding="utf-8"),
    )


def export_tiny(args: argparse.Namespace) -> Path:
    """`sparc-engine export tiny --out DIR`: build once; a complete build with the same seed is kept."""
    out = Path(args.out)
    return out if is_complete_build(out, args.seed) else build_tiny_qwen3vl(out, seed=args.seed)
