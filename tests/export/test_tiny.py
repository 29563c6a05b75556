"""The tiny random Qwen3-VL builder: reproducible, loadable, generates, tokens line up with the config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer  # noqa: E402

from export.tiny import (  # noqa: E402
    COMPLETE_MARKER,
    TINY_QWEN3VL,
    TinyQwen3VLSizes,
    build_tiny_qwen3vl,
    build_tiny_qwen3vl_cached,
    tiny_processor,
)
from export.tokenizer_offline import QWEN_SPECIAL_TOKENS  # noqa: E402

PROMPT_TAIL = "Where is the cat?<|im_end|>\n<|im_start|>assistant\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3vl_cached(tmp_path_factory.mktemp("models"), seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir: Path):
    return transformers.Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_dir: Path):
    return transformers.Qwen2TokenizerFast.from_pretrained(tiny_dir)


def _random_image(height: int = 64, width: int = 64):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _manual_image_prompt(tiny_dir: Path, hf_tokenizer, image) -> dict:
    """Prompt built by hand: one `<|image_pad|>` per merged 2x2 patch group (grid_t*grid_h*grid_w / 4)."""
    image_processor = transformers.Qwen2VLImageProcessor.from_pretrained(tiny_dir)
    vision = image_processor(images=[image], return_tensors="pt")
    n_image_tokens = int(vision["image_grid_thw"].prod()) // TINY_QWEN3VL.spatial_merge_size**2
    text = (
        "<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * n_image_tokens
        + "<|vision_end|>"
        + PROMPT_TAIL
    )
    encoded = hf_tokenizer(text, return_tensors="pt")
    image_pad = hf_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        # transformers 5.23 refuses image inputs without it: M-RoPE positions are derived from it.
        "mm_token_type_ids": (encoded["input_ids"] == image_pad).int(),
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = build_tiny_qwen3vl(tmp_path / "a", seed=0)
    b = build_tiny_qwen3vl(tmp_path / "b", seed=0)
    c = build_tiny_qwen3vl(tmp_path / "c", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert _sha256(a / name) == _sha256(b / name), name
    assert _sha256(a / "model.safetensors") != _sha256(c / "model.safetensors")
    # The tokenizer does not depend on the seed, so one vocabulary serves every tiny model.
    assert _sha256(a / "tokenizer.json") == _sha256(c / "tokenizer.json")


def test_cached_build_reuses_only_complete_directories(tmp_path: Path) -> None:
    first = build_tiny_qwen3vl_cached(tmp_path, seed=0)
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_qwen3vl_cached(tmp_path, seed=0) == first
    assert weights.stat().st_mtime_ns == stamp  # reused, not rebuilt

    # A build killed before its marker was written is rebuilt, even if some files look fine.
    (first / COMPLETE_MARKER).unlink()
    weights.write_bytes(b"truncated")
    again = build_tiny_qwen3vl_cached(tmp_path, seed=0)
    assert (again / COMPLETE_MARKER).is_file()
    recorded = json.loads((again / COMPLETE_MARKER).read_text())
    assert recorded["model_safetensors_sha256"] == _sha256(again / "model.safetensors")


def test_special_tokens_encode_as_single_ids(tiny_dir: Path, hf_tokenizer) -> None:
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    for token in QWEN_SPECIAL_TOKENS:
        assert raw.encode(token).ids == [raw.token_to_id(token)], token

    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    ids = raw.encode(text).ids
    tid = raw.token_to_id
    assert ids[0] == tid("<|im_start|>") and ids[-1] == tid("<|im_end|>")
    start = ids.index(tid("<|vision_start|>"))
    assert ids[start : start + 3] == [tid("<|vision_start|>"), tid("<|image_pad|>"), tid("<|vision_end|>")]
    assert raw.decode(ids, skip_special_tokens=False) == text

    # The transformers wrapper must tokenize exactly like the raw tokenizer (engines use the raw one).
    json_text = '```json\n[{"bbox_2d": [12, 34, 560, 999], "label": "dog"}]\n``` héllo'
    for sample in (text, json_text):
        assert hf_tokenizer(sample)["input_ids"] == raw.encode(sample).ids
    assert hf_tokenizer.decode(raw.encode(json_text).ids) == json_text
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.pad_token == "<|endoftext|>"


def test_config_matches_tokenizer_and_sizes(tiny_dir: Path, hf_tokenizer) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    tid = hf_tokenizer.convert_tokens_to_ids
    assert config.image_token_id == tid("<|image_pad|>")
    assert config.video_token_id == tid("<|video_pad|>")
    assert config.vision_start_token_id == tid("<|vision_start|>")
    assert config.vision_end_token_id == tid("<|vision_end|>")

    text, vision = config.text_config, config.vision_config
    assert text.eos_token_id == tid("<|im_end|>") and text.pad_token_id == tid("<|endoftext|>")
    assert text.vocab_size >= len(hf_tokenizer) and text.vocab_size % 64 == 0
    assert text.rope_parameters["mrope_section"] == [6, 5, 5] and text.rope_parameters["mrope_interleaved"]
    assert text.rope_parameters["rope_theta"] == TINY_QWEN3VL.rope_theta
    assert vision.out_hidden_size == text.hidden_size
    assert len(vision.deepstack_visual_indexes) < text.num_hidden_layers
    assert not config.tie_word_embeddings

    generation = transformers.GenerationConfig.from_pretrained(tiny_dir)
    assert set(generation.eos_token_id) == {tid("<|im_end|>"), tid("<|endoftext|>")}


def test_sizes_reject_as_many_deepstack_layers_as_text_layers() -> None:
    with pytest.raises(ValueError, match="deepstack"):
        TinyQwen3VLSizes(text_layers=1, deepstack_visual_indexes=(0,))


def test_generate_on_image_prompt_is_deterministic_and_varied(tiny_dir: Path, model, hf_tokenizer) -> None:
    inputs = _manual_image_prompt(tiny_dir, hf_tokenizer, _random_image())
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64x64 px -> 4x4 patches -> 4 LLM tokens
    prompt_len = inputs["input_ids"].shape[1]

    runs = []
    for _ in range(2):
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        runs.append(out)
    new_tokens = runs[0].sequences[0, prompt_len:].tolist()
    assert len(new_tokens) > 0
    assert new_tokens == runs[1].sequences[0, prompt_len:].tolist()
    assert len(set(new_tokens)) > 1, "greedy output should not be one repeated token"
    assert max(new_tokens) < len(hf_tokenizer), "padding rows of the vocab must never win"
    # Clear winners at each step, so runtimes with slightly different rounding pick the same tokens.
    margins = [float(step[0].topk(2).values[0] - step[0].topk(2).values[1]) for step in runs[0].scores]
    assert min(margins) > 1e-3


def test_processor_chat_template_matches_manual_prompt(tiny_dir: Path, model, hf_tokenizer) -> None:
    processor = tiny_processor(tiny_dir)
    image = _random_image()
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Where is the cat?"}]
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    manual = _manual_image_prompt(tiny_dir, hf_tokenizer, image)
    for key in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(inputs[key], manual[key]), key

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4)
    assert out.shape[1] > inputs["input_ids"].shape[1]
