"""`sparc-engine export onnx` on the tiny Qwen3-VL: bundle layout, manifest, graphs against transformers.

Tolerance: fp32 graphs run by onnxruntime match transformers within ~5e-6 (max abs) on the tiny model;
the tests allow 2e-5.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")


from export.onnx import export_onnx, gather_external_data  # noqa: E402
from runtimes.bundle import read_manifest, sha256_file, verify  # noqa: E402
from runtimes.onnx import OnnxRuntime  # noqa: E402
from runtimes.protocol import RuntimeInputError  # noqa: E402
from runtimes.torch_ref import TorchRefRuntime, checkpoint_image_config  # noqa: E402
from tests.support import picture  # noqa: E402

ATOL = 2e-5


@pytest.fixture(scope="module")
def onnx_runtime(tiny_qwen3vl_onnx: Path) -> OnnxRuntime:
    return OnnxRuntime(tiny_qwen3vl_onnx, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_qwen3vl: Path) -> TorchRefRuntime:
    return TorchRefRuntime(tiny_qwen3vl, device="cpu")


def test_manifest_describes_every_file(tiny_qwen3vl_onnx: Path, tiny_qwen3vl: Path) -> None:
    manifest = read_manifest(tiny_qwen3vl_onnx)
    assert manifest.format == "onnx" and manifest.dtype == "fp32"
    assert manifest.architecture == "Qwen3VLForConditionalGeneration"
    assert manifest.variants["base"] == {
        "vision": "base/vision.onnx",
        "embed": "base/embed.onnx",
        "decoder": "base/decoder.onnx",
    }
    # the LoRA targets decoder projections only: the perception variant carries only the decoder
    assert manifest.variants["perception"] == {"decoder": "perception/decoder.onnx"}
    assert set(manifest.files) == {
        "tokenizer.json",
        *manifest.variants["base"].values(),
        "perception/decoder.onnx",
    }
    for relative, digest in manifest.files.items():
        assert sha256_file(tiny_qwen3vl_onnx / relative) == digest
    verify(tiny_qwen3vl_onnx, manifest)
    assert manifest.files["perception/decoder.onnx"] != manifest.files["base/decoder.onnx"]
    assert manifest.image == checkpoint_image_config(tiny_qwen3vl)
    assert manifest.tokens["image_token_id"] == TorchRefRuntime(tiny_qwen3vl).image_token_id
    assert manifest.tokens["eos_token_ids"] == TorchRefRuntime(tiny_qwen3vl).eos_ids
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(manifest.tools)
    assert manifest.model["num_layers"] == 3 and manifest.model["num_deepstack"] == 1


def test_graph_io_names(tiny_qwen3vl_onnx: Path) -> None:
    decoder = ort.InferenceSession(
        str(tiny_qwen3vl_onnx / "base/decoder.onnx"), providers=["CPUExecutionProvider"]
    )
    inputs = [i.name for i in decoder.get_inputs()]
    assert inputs[:5] == [
        "inputs_embeds",
        "position_ids",
        "attention_mask",
        "deepstack_embeds",
        "cache_position",
    ]
    assert inputs[5:7] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o.name for o in decoder.get_outputs()][:2] == ["logits", "present.0.key"]
    # the shared prefix: batch fixed to 1 (one copy for every sequence), its length free
    prefix = [i for i in decoder.get_inputs() if i.name.startswith("prefix_key_values.")]
    assert [i.name for i in prefix[:2]] == ["prefix_key_values.0.key", "prefix_key_values.0.value"]
    assert len(prefix) == len([n for n in inputs if n.startswith("past_key_values.")])
    assert all(i.shape[0] == 1 and i.shape[2] == "prefix" for i in prefix)
    vision = ort.InferenceSession(
        str(tiny_qwen3vl_onnx / "base/vision.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in vision.get_outputs()] == ["image_embeds", "deepstack_features"]


def test_the_decoder_needs_no_contrib_ops(tiny_qwen3vl_onnx: Path) -> None:
    """TensorRT parses the decoder as it is: its shared-prefix attention is written in standard ops."""
    import onnx

    from export.tensorrt.lower import lower_contrib_attention

    graph = onnx.load(str(tiny_qwen3vl_onnx / "base/decoder.onnx"), load_external_data=False)
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert lower_contrib_attention(graph, "fp32") == 0


def test_the_patch_embedding_is_one_matrix_product(tiny_qwen3vl_onnx: Path, tiny_qwen3vl: Path) -> None:
    """transformers' Conv3d over pre-cut patches is exported as a Gemm on the (patches, C*T*P*P) matrix:
    onnxruntime's CPU Conv is several times slower for the same product. Its values: the vision parity
    tests below."""
    import onnx

    graph = onnx.load(str(tiny_qwen3vl_onnx / "base/vision.onnx"), load_external_data=False).graph
    assert "Conv" not in {node.op_type for node in graph.node}
    vision = json.loads((tiny_qwen3vl / "config.json").read_text())["vision_config"]
    patch = vision.get("in_channels", 3) * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    embedding = sorted([vision["hidden_size"], patch])
    weights = {tensor.name for tensor in graph.initializer if sorted(tensor.dims) == embedding}
    assert [node.op_type for node in graph.node if weights & set(node.input)] == ["Gemm"]


@pytest.mark.parametrize(
    ("batch", "length", "prefix", "written", "own"),
    [(1, 5, 0, 0, 5), (3, 1, 7, 1, 2), (2, 4, 6, 0, 4), (2, 1, 3, 1, 6)],  # the last: a tail after the chunk
)
def test_shared_prefix_attention_is_eager_attention_over_the_repeated_prefix(
    batch, length, prefix, written, own
):
    """One batch-1 prefix + each row's own KV buffer gives what transformers' eager attention gives on the
    prefix repeated per row and concatenated before the own KV (grouped heads, a causal mask). The chunk
    goes into the buffer after `written` slots; the slots after it are the unwritten tail, which no query
    may see."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.modeling_qwen3_vl import eager_attention_forward

    from export.onnx.base import FlatCache, TextDecoder, attention_bias, shared_prefix_attention

    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim = 4, 2, 8
    module = torch.nn.Module()
    module.layer_idx, module.num_key_value_groups, module.training = 1, heads // kv_heads, False
    module.config, module.head_dim = SimpleNamespace(num_key_value_heads=kv_heads), head_dim
    query = torch.randn(batch, heads, length, head_dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, own, head_dim, generator=generator) for _ in range(2))
    shared = [torch.randn(1, kv_heads, prefix, head_dim, generator=generator) for _ in range(4)]
    cache = FlatCache(
        torch.zeros(batch, length, 1), torch.tensor([written]), (key, value, key, value, *shared)
    )
    allowed = TextDecoder.causal(cache, prefix + own)[None, None].expand(batch, 1, -1, -1)
    mask = attention_bias(allowed, query.dtype)
    got, _ = shared_prefix_attention(module, query, key, value, mask, 0.3, flat_cache=cache)
    visible = prefix + written + length  # keys before the tail
    full_key = torch.cat([shared[2].expand(batch, -1, -1, -1), key], dim=2)[:, :, :visible]
    full_value = torch.cat([shared[3].expand(batch, -1, -1, -1), value], dim=2)[:, :, :visible]
    expected, _ = eager_attention_forward(module, query, full_key, full_value, mask[..., :visible], 0.3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sizes", [[(64, 64)], [(96, 160)], [(200, 72)], [(256, 256)], [(64, 128), (96, 32)]])
def test_vision_graph_matches_transformers(onnx_runtime, reference, sizes) -> None:
    """Any image size (non-square, several images in one run) through the one graph."""
    from engine.families import family_for

    family = family_for(reference.info.architecture, reference.info.image)
    images = [family.prepare_image(picture(w, h, seed=i), None, f"v{i}") for i, (w, h) in enumerate(sizes)]
    with torch.inference_mode():
        expected = reference.model("base").model.visual(
            torch.from_numpy(np.concatenate([im.pixel_values for im in images])),
            grid_thw=torch.tensor([im.grid_thw for im in images]),
        )
    embeds, deepstack = onnx_runtime.vision(onnx_runtime.graphs("base"), images)
    assert embeds.shape == (sum(im.n_tokens for im in images), 128)
    np.testing.assert_allclose(embeds, expected.pooler_output.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(deepstack, torch.stack(expected.deepstack_features).numpy(), rtol=0, atol=ATOL)


def test_vision_graph_keeps_frames_apart(onnx_runtime, reference) -> None:
    """Several frames (images, or a video's frames) in one run attend only within their frame."""
    from runtimes.families.qwen3vl import qwen_vision_tables

    grids = [(1, 4, 6), (2, 2, 4), (1, 6, 2)]
    tables = qwen_vision_tables(grids, num_grid_per_side=8, merge_size=2)
    pixels = np.random.default_rng(0).standard_normal((int(tables.cu_seqlens[-1]), 3 * 2 * 16 * 16))
    pixels = pixels.astype(np.float32)
    lengths = np.diff(tables.cu_seqlens)
    embeds, deepstack = onnx_runtime.graphs("base").vision.run(
        None,
        {
            "pixel_values": pixels,
            "interp_indices": tables.interp_indices,
            "interp_weights": tables.interp_weights,
            "rotary_pos_ids": tables.rotary_pos_ids,
            "frame_ids": np.repeat(np.arange(len(lengths)), lengths),
        },
    )
    with torch.inference_mode():
        expected = reference.model("base").model.visual(
            torch.from_numpy(pixels), grid_thw=torch.tensor(grids)
        )
    np.testing.assert_allclose(embeds, expected.pooler_output.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(deepstack, torch.stack(expected.deepstack_features).numpy(), rtol=0, atol=ATOL)


def test_fp16_graphs_are_typed_fp16_and_close_to_fp32(tiny_qwen3vl: Path, tmp_path: Path, reference) -> None:
    """fp16 is the graph's own type (TensorRT 11 wants strongly typed networks), not a cast at the edges."""
    import onnx

    from engine.families import family_for

    args = argparse.Namespace(
        model=tiny_qwen3vl, out=tmp_path / "b16", perception_lora=None, dtype="fp16", quant=None
    )
    bundle = export_onnx(args)
    assert read_manifest(bundle).dtype == "fp16"
    decoder = onnx.load(str(bundle / "base/decoder.onnx"))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    weights = [t.data_type for t in decoder.graph.initializer if t.data_type in float_types]
    assert weights and set(weights) == {onnx.TensorProto.FLOAT16}
    ios = [*decoder.graph.input, *decoder.graph.output]
    assert {v.type.tensor_type.elem_type for v in ios} == {onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64}

    family = family_for(reference.info.architecture, reference.info.image)
    prefix = family.image_prefix(family.prepare_image(picture(96, 160), None, "fp16"))
    got = OnnxRuntime(bundle, device="cpu").prefill(prefix).state[1]
    expected = reference.prefill(prefix).state[1]
    assert got.dtype == np.float32  # the runtime hands float32 logits to the sampler
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-2)  # fp16: ~5e-3 measured, logits span ~+-4


def test_unknown_architectures_are_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    args = argparse.Namespace(
        model=tmp_path / "m", out=tmp_path / "b", perception_lora=None, dtype="fp32", quant=None
    )
    with pytest.raises(
        RuntimeInputError, match="ONNX export: architecture 'LlamaForCausalLM' is not registered"
    ):
        export_onnx(args)


def test_per_tensor_external_data_is_gathered_into_one_file(tiny_qwen3vl_onnx: Path, tmp_path: Path) -> None:
    """Past 2 GB the exporter writes one file per tensor; the bundle keeps `<graph>.onnx` + `<graph>.onnx.data`."""
    import onnx

    scattered = tmp_path / "scattered"
    scattered.mkdir()
    model = onnx.load(str(tiny_qwen3vl_onnx / "base/embed.onnx"))
    onnx.save_model(
        model,
        str(scattered / "embed.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(scattered.iterdir())) > 1
    gather_external_data(scattered / "embed.onnx", tmp_path / "embed.onnx")
    assert sorted(p.name for p in tmp_path.glob("embed.onnx*")) == ["embed.onnx", "embed.onnx.data"]
    ids = np.array([[1, 2, 3]], dtype=np.int64)
    session = ort.InferenceSession(str(tmp_path / "embed.onnx"), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(
        str(tiny_qwen3vl_onnx / "base/embed.onnx"), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_array_equal(
        session.run(None, {"input_ids": ids})[0], original.run(None, {"input_ids": ids})[0]
    )
