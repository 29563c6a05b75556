"""Molmo2 ONNX graphs (export/onnx/molmo2.py) against transformers, run with onnxruntime directly, and the
bundle `sparc-engine export onnx` writes for it.

A small host loop here does what the runtime does (runtimes/onnx/molmo2.py), graph by graph: embed the
prompt, add the image features at <im_patch> tokens, prefill with the image-token types, decode greedily.
The runtime itself is tested in tests/runtimes/test_onnx_molmo2.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from PIL import Image as PILImage  # noqa: E402

from engine.cli import main  # noqa: E402
from engine.families import family_for  # noqa: E402
from runtimes.bundle import read_manifest, verify  # noqa: E402
from runtimes.families import molmo2 as image_layout  # noqa: E402
from runtimes.protocol import Sampling  # noqa: E402
from runtimes.torch_ref import TorchRefRuntime  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_molmo2_onnx):
    return tiny_molmo2_onnx


@pytest.fixture(scope="module")
def runtime(tiny_molmo2):
    return TorchRefRuntime(tiny_molmo2, device="cpu")


def sessions(bundle):
    return {
        role: ort.InferenceSession(str(bundle / f"base/{role}.onnx"))
        for role in ("vision", "embed", "decoder")
    }


def picture(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return PILImage.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_vision_features_match_transformers(bundle, runtime):
    family = family_for(runtime.info.architecture, runtime.info.image)
    image = family.prepare_image(picture(500, 300), 644, "k")
    (features,) = sessions(bundle)["vision"].run(
        None, {"pixel_values": image.pixel_values, "image_token_pooling": image.extras["image_token_pooling"]}
    )
    model = runtime.model("base")
    with torch.inference_mode():
        expected = model.model.get_image_features(
            torch.from_numpy(image.pixel_values),
            torch.from_numpy(image.extras["image_token_pooling"]),
            torch.from_numpy(image.extras["image_grids"][None]),
        ).pooler_output
    np.testing.assert_allclose(features, torch.cat(expected).numpy(), atol=1e-5, rtol=1e-5)


def _decode_greedy(graphs, runtime, prompt, steps: int, split: int) -> list[int]:
    """Prefill `prompt` in two chunks (split at token `split`, as prefix + suffix), then decode greedily,
    all into one own KV buffer with room for the prompt and the steps."""
    layers = runtime.family.config["text_config"]["num_hidden_layers"]
    text = runtime.family.config["text_config"]
    kv_heads, head_dim = text["num_key_value_heads"], text.get("head_dim")
    ids = np.array(prompt.token_ids, dtype=np.int64)
    (embeds,) = graphs["embed"].run(None, {"input_ids": ids[None]})
    if prompt.images:
        pixels, pooling, _ = image_layout.stack_images(prompt.images)
        (features,) = graphs["vision"].run(None, {"pixel_values": pixels, "image_token_pooling": pooling})
        embeds[0, prompt.image_mask] += features  # Molmo2 adds image features to the <im_patch> embeddings
    types = image_layout.token_types(ids, runtime.family.vocab)
    size = len(ids) + steps
    past = [np.zeros((1, kv_heads, size, head_dim), np.float32) for _ in range(2 * layers)]
    # an empty shared prefix: the graph is then a plain KV decoder, which the runtime's forks must match
    no_prefix = {
        f"prefix_key_values.{i // 2}.{('key', 'value')[i % 2]}": np.zeros(
            (1, kv_heads, 0, head_dim), np.float32
        )
        for i in range(2 * layers)
    }

    def run(embeds_chunk, start):
        length = embeds_chunk.shape[1]
        written = np.zeros((1, size), np.int64)  # slots not written yet are no image tokens
        written[0, : min(start + length, len(types))] = types[: start + length]
        feeds = {
            "inputs_embeds": embeds_chunk,
            "position_ids": np.arange(start, start + length, dtype=np.int64)[None],
            "attention_mask": np.ones((1, size), np.int64),
            "token_types": written,
            "cache_position": np.array([start], np.int64),
        }
        feeds |= {f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": p for i, p in enumerate(past)}
        logits, *present = graphs["decoder"].run(None, feeds | no_prefix)
        return logits[0], present

    _, past = run(embeds[:, :split], 0)
    logits, past = run(embeds[:, split:], split)
    tokens, length = [], len(ids)
    for _ in range(steps):
        token = int(np.argmax(logits))
        tokens.append(token)
        if token in runtime.eos_ids:
            break
        (step_embeds,) = graphs["embed"].run(None, {"input_ids": np.array([[token]], np.int64)})
        logits, past = run(step_embeds, length)
        length += 1
    return tokens


@pytest.mark.parametrize(("size", "resolution"), [((64, 64), 512), ((300, 500), 644)])
def test_greedy_tokens_match_the_reference_runtime(bundle, runtime, size, resolution):
    family = family_for(runtime.info.architecture, runtime.info.image)
    image = family.prepare_image(picture(*size, seed=1), resolution, f"onnx{size}")
    prefix_segments = family.image_prefix(image)
    suffix = family.question_suffix("Point to the dog.")
    expected = runtime.generate(runtime.prefill(prefix_segments, "base"), suffix, 1, Sampling(12))[0]
    prompt = runtime._tokenize(prefix_segments + suffix, 0)
    split = len(runtime._tokenize(prefix_segments, 0).token_ids)
    got = _decode_greedy(sessions(bundle), runtime, prompt, 12, split)
    assert got == expected.token_ids


def test_the_manifest_describes_a_molmo2_bundle(bundle, runtime):
    manifest = read_manifest(bundle)
    verify(bundle, manifest)  # every listed file is there with its sha256
    config = runtime.family.config
    assert manifest.architecture == "Molmo2ForConditionalGeneration" and manifest.format == "onnx"
    assert manifest.variants["base"] == {r: f"base/{r}.onnx" for r in ("vision", "embed", "decoder")}
    # the LoRA's q/v projections change the ViT and the text decoder; the embeddings are base's
    assert manifest.variants["perception"] == {r: f"perception/{r}.onnx" for r in ("vision", "decoder")}
    assert manifest.tokens["image_token_id"] == config["image_patch_id"]
    assert manifest.tokens["eos_token_ids"] == runtime.eos_ids
    assert manifest.image.patch_size == 14 and manifest.image.mean == manifest.image.std == (0.5,) * 3
    assert manifest.image == runtime.info.image  # Molmo2's own ImageConfig (temporal_patch_size 1)
    model = manifest.model
    assert model["num_layers"] == config["text_config"]["num_hidden_layers"]
    # the switches the runtime lays image tokens out by, and the preprocessing the engine implements
    assert model["processor"] == {
        "image_use_col_tokens": True,
        "use_single_crop_col_tokens": None,
        "use_single_crop_start_token": True,
    }
    image = manifest.image  # the preprocessing constants, as the checkpoint states them
    assert (image.crop_size, image.overlap_margins, image.merge_size, image.max_crops) == (378, (4, 4), 2, 8)


def test_contradicting_preprocessing_is_refused(tiny_molmo2, tmp_path, capsys):
    checkpoint = shutil.copytree(tiny_molmo2, tmp_path / "checkpoint")
    config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    config["patch_size"] = 16
    (checkpoint / "preprocessor_config.json").write_text(json.dumps(config))
    assert main(["export", "onnx", "--model", str(checkpoint), "--out", str(tmp_path / "bundle")]) != 0
    assert (
        "preprocessor_config.json patch_size=16 contradicts config.json vision_config.patch_size=14"
        in capsys.readouterr().err
    )
