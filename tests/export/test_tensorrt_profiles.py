"""TensorRT profile sizing: token counts of each stage, and the (min, opt, max) shapes they give each graph."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.spec import validate
from export.tensorrt.profiles import (
    AxisProfile,
    Workload,
    graph_profiles,
    image_tokens,
    onnx_inputs,
    plan_profiles,
    workload_from_spec,
)
from runtimes.protocol import ImageConfig

QWEN = ImageConfig()  # patch 16, merge 2: one token per 32 x 32 px; max_pixels 16,777,216
MODEL = {"model": {"bundle": "unused"}}

# The stages of specs/demo.yaml and specs/qwen3vl-sparc-wbf8.yaml, inline so the numbers below stay theirs.
DEMO = validate(
    {
        **MODEL,
        "stages": [
            {"perceive": {"resolution": 256, "rollouts": 4, "max_new_tokens": 48}},
            {"fuse": {"max_regions": 4}},
            {"crop": {"resolution": 128, "max_crops": 4}},
            {"reason": {"resolution": 256, "max_new_tokens": 24}},
        ],
    }
)
WBF8 = validate(
    {
        **MODEL,
        "stages": [
            {"perceive": {"resolution": 512, "rollouts": 8, "max_new_tokens": 256}},
            {"fuse": {"max_regions": 4}},
            {"crop": {"resolution": 512, "max_crops": 4}},
            {"reason": {"resolution": 512, "max_new_tokens": 256}},
        ],
    }
)
BASELINE_FULL = validate({**MODEL, "stages": [{"reason": {"resolution": "full", "max_new_tokens": 256}}]})

# Graph inputs as the ONNX exporter writes them for the tiny Qwen3-VL (hidden 128, 2 KV heads of 32, 1 deepstack)
VISION = {
    "pixel_values": ("patches", 1536),
    "interp_indices": ("patches", 4),
    "interp_weights": ("patches", 4),
    "rotary_pos_ids": ("patches", 2),
    "frame_ids": ("patches",),
}
EMBED = {"input_ids": ("batch", "sequence")}
DECODER = {
    "inputs_embeds": ("batch", "sequence", 128),
    "position_ids": (3, "batch", "sequence"),
    "attention_mask": ("batch", "total"),
    "deepstack_embeds": (1, "batch", "sequence", 128),
    "past_key_values.0.key": ("batch", 2, "past", 32),
    "past_key_values.0.value": ("batch", 2, "past", 32),
    "prefix_key_values.0.key": (1, 2, "prefix", 32),
    "prefix_key_values.0.value": (1, 2, "prefix", 32),
}


@pytest.mark.parametrize(
    ("resolution", "tokens"),
    [(256, 64), (512, 256), (500, 256), (128, 16), (100, 9), (16, 1), ("full", 16384)],
)
def test_image_tokens_are_the_square_worst_case(resolution, tokens) -> None:
    # 500 px rounds to 512 (16 cells), 100 px to 96 (3 cells), 16 px grows to one 32 px cell
    assert image_tokens(resolution, QWEN) == tokens


def test_full_resolution_follows_max_pixels() -> None:
    assert image_tokens("full", ImageConfig(max_pixels=1024 * 1024)) == 1024
    assert image_tokens(2048, ImageConfig(max_pixels=1024 * 1024)) == 1024  # shrunk to max_pixels


def test_workload_from_specs() -> None:
    assert workload_from_spec(DEMO) == Workload(
        perceive_resolution=256,
        rollouts=4,
        perceive_new_tokens=48,
        crops=4,
        crop_resolution=128,
        reason_resolution=256,
        reason_new_tokens=24,
    )
    assert workload_from_spec(WBF8) == Workload()  # the defaults are the WBF N=8 spec
    baseline = workload_from_spec(BASELINE_FULL)
    assert (baseline.perceive_resolution, baseline.rollouts, baseline.crops) == (None, 1, 0)
    fewer_regions = validate(
        {
            **MODEL,
            "stages": [
                {"perceive": {}},
                {"fuse": {"max_regions": 2}},
                {"crop": {"max_crops": 4}},
                {"reason": {}},
            ],
        }
    )
    assert workload_from_spec(fewer_regions).crops == 2  # fusion keeps at most 2 regions to crop


def test_demo_spec_profiles() -> None:
    plan = plan_profiles(workload_from_spec(DEMO), QWEN)
    # perceive: 64 image + 2 wrappers + 256 text = 322; reason: 64 + 2 + 4 x (16 + 2) + 256 = 394
    assert (plan.longest_prompt, plan.context) == (394, 418)  # context: reason 394 + 24 > perceive 322 + 48
    assert plan.vision.axes == {"patches": (4, 256, 512)}  # 4 patches a token; reason: 64 + 4 x 16 tokens
    assert plan.prefill.axes == {
        "batch": (1, 1, 1),
        "sequence": (1, 322, 394),
        "past": (0, 0, 393),
        "prefix": (0, 0, 0),
        "total": (1, 322, 787),
    }
    assert plan.decode.axes == {
        "batch": (1, 4, 4),
        "sequence": (1, 1, 1),
        "prefix": (1, 322, 394),  # the prompt, one copy for the batch; opt: the perceive prompt
        "past": (0, 24, 47),  # each rollout's own tokens; opt: half of perceive's 48 new tokens
        "total": (2, 347, 442),
    }


def test_wbf8_spec_profiles() -> None:
    plan = plan_profiles(workload_from_spec(WBF8), QWEN)
    # perceive: 256 + 2 + 256 = 514; reason: 256 + 2 + 4 x (256 + 2) + 256 = 1546; context 1546 + 256
    assert (plan.longest_prompt, plan.context) == (1546, 1802)
    assert plan.vision.axes == {"patches": (4, 1024, 5120)}
    assert plan.prefill.axes["sequence"] == (1, 514, 1546)
    assert plan.prefill.axes["past"] == (0, 0, 1545)
    assert plan.decode.axes["batch"] == (1, 8, 8)
    assert plan.decode.axes["prefix"] == (1, 514, 1546)
    assert plan.decode.axes["past"] == (0, 128, 255)
    assert plan.decode.axes["total"] == (2, 643, 1802)


def test_baseline_without_perceive_sizes_from_the_reason_stage() -> None:
    plan = plan_profiles(workload_from_spec(BASELINE_FULL), QWEN, max_positions=262144)
    assert (plan.longest_prompt, plan.context) == (16384 + 2 + 256, 16642 + 256)
    assert plan.vision.axes == {"patches": (4, 65536, 65536)}
    assert plan.decode.axes["batch"] == (1, 1, 1)


def test_a_context_over_the_model_positions_is_refused() -> None:
    with pytest.raises(ValueError, match=r"context of 16898 tokens .* 4096 positions"):
        plan_profiles(workload_from_spec(BASELINE_FULL), QWEN, max_positions=4096)
    plan_profiles(workload_from_spec(WBF8), QWEN, max_positions=1802)  # exactly fits


def test_text_budget_and_workload_checks() -> None:
    longer = plan_profiles(Workload(text_tokens=1000), QWEN)
    assert longer.longest_prompt == 1546 + 1000 - 256
    with pytest.raises(ValueError, match="workload out of range"):
        Workload(rollouts=0)


def test_every_profile_point_is_runnable() -> None:
    """At each of min, opt and max: total = prefix + past + sequence (the mask covers exactly the keys)."""
    for spec in (DEMO, WBF8):
        plan = plan_profiles(workload_from_spec(spec), QWEN)
        for axes in (plan.prefill.axes, plan.decode.axes):
            for k in range(3):
                assert axes["total"][k] == axes["prefix"][k] + axes["past"][k] + axes["sequence"][k]
            for low, opt, high in axes.values():
                assert low <= opt <= high


def test_every_in_place_profile_point_is_runnable() -> None:
    """A decoder writing its past buffer in place: total = prefix + past, and the buffer holds the chunk."""
    for spec in (DEMO, WBF8):
        plan = plan_profiles(workload_from_spec(spec), QWEN)
        for axes in (plan.in_place_prefill.axes, plan.in_place_decode.axes):
            for k in range(3):
                assert axes["total"][k] == axes["prefix"][k] + axes["past"][k]
                assert axes["past"][k] >= axes["sequence"][k]
            for low, opt, high in axes.values():
                assert low <= opt <= high


def test_in_place_decoder_shapes() -> None:
    """With cache_position, a suffix reads the cached prompt as the prefix and the buffer holds the
    suffix and the new tokens; the graphs without it keep their profiles."""
    plan = plan_profiles(workload_from_spec(WBF8), QWEN)
    prefill, decode = graph_profiles({**DECODER, "cache_position": (1,)}, plan)
    assert (prefill.name, decode.name) == ("prefill", "decode") and "cache_position" not in decode.shapes
    assert prefill.shapes["prefix_key_values.0.key"] == ((1, 2, 0, 32), (1, 2, 0, 32), (1, 2, 1545, 32))
    assert prefill.shapes["past_key_values.0.key"] == ((1, 2, 1, 32), (1, 2, 514, 32), (1, 2, 1801, 32))
    assert decode.shapes["past_key_values.0.value"] == ((1, 2, 1, 32), (8, 2, 256, 32), (8, 2, 1801, 32))
    assert decode.shapes["attention_mask"] == ((1, 2), (8, 770), (8, 3347))
    assert graph_profiles(DECODER, plan)[1].shapes["past_key_values.0.value"][2] == (8, 2, 255, 32)


def test_graph_shapes_for_the_exported_input_names() -> None:
    plan = plan_profiles(workload_from_spec(WBF8), QWEN)
    (vision,) = graph_profiles(VISION, plan)
    assert vision.name == "vision"
    assert vision.shapes["pixel_values"] == ((4, 1536), (1024, 1536), (5120, 1536))
    assert vision.shapes["frame_ids"] == ((4,), (1024,), (5120,))

    prefill, decode = graph_profiles(DECODER, plan)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.shapes["inputs_embeds"] == ((1, 1, 128), (1, 514, 128), (1, 1546, 128))
    assert prefill.shapes["position_ids"] == ((3, 1, 1), (3, 1, 514), (3, 1, 1546))
    assert prefill.shapes["past_key_values.0.key"] == ((1, 2, 0, 32), (1, 2, 0, 32), (1, 2, 1545, 32))
    assert prefill.shapes["prefix_key_values.0.key"] == ((1, 2, 0, 32),) * 3  # a prefill shares no prefix
    assert decode.shapes["deepstack_embeds"] == ((1, 1, 1, 128), (1, 8, 1, 128), (1, 8, 1, 128))
    assert decode.shapes["attention_mask"] == ((1, 2), (8, 643), (8, 1802))
    # decoding: the prompt is one batch-1 prefix; each rollout's own past holds only its new tokens
    assert decode.shapes["prefix_key_values.0.key"] == ((1, 2, 1, 32), (1, 2, 514, 32), (1, 2, 1546, 32))
    assert decode.shapes["past_key_values.0.value"] == ((1, 2, 0, 32), (8, 2, 128, 32), (8, 2, 255, 32))
    assert decode.as_dict()["attention_mask"] == [[1, 2], [8, 643], [8, 1802]]

    embed_prefill, embed_decode = graph_profiles(EMBED, plan)  # same axes as the decoder's
    assert embed_prefill.shapes["input_ids"] == ((1, 1), (1, 514), (1, 1546))
    assert embed_decode.shapes["input_ids"] == ((1, 1), (8, 1), (8, 1))


def test_static_inputs_get_no_profile_and_unknown_axes_fail_loudly() -> None:
    plan = plan_profiles(Workload(), QWEN)
    (vision,) = graph_profiles({**VISION, "scale": (1,)}, plan)
    assert "scale" not in vision.shapes
    with pytest.raises(ValueError, match=r"dynamic axes \['batch', 'heads'\]"):
        graph_profiles({"x": ("batch", "heads")}, plan)
    with pytest.raises(ValueError, match=r"axes \['tokens'\] that the decode profile does not size"):
        AxisProfile("decode", plan.decode.axes).shapes({"x": ("batch", "tokens")})


def _write_graph(path: Path, inputs: dict[str, tuple], weight_as_input: bool = False) -> None:
    """A graph whose only content is its inputs (each passed through an Identity)."""
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    values = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims)) for name, dims in inputs.items()
    ]
    outputs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None) for name in inputs]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in inputs]
    initializers = []
    if weight_as_input:  # how pre-IR-4 exporters listed weights
        weight = numpy_helper.from_array(np.zeros((2, 2), np.float32), "weight")
        initializers.append(weight)
        values.append(helper.make_tensor_value_info("weight", TensorProto.FLOAT, [2, 2]))
    graph = helper.make_graph(nodes, "g", values, outputs, initializer=initializers)
    onnx.save(helper.make_model(graph), str(path))


def test_onnx_inputs_reads_names_and_axes(tmp_path: Path) -> None:
    _write_graph(tmp_path / "decoder.onnx", DECODER, weight_as_input=True)
    assert onnx_inputs(tmp_path / "decoder.onnx") == DECODER  # the weight is not an input to size

    _write_graph(tmp_path / "vision.onnx", {"pixel_values": (None, 1536)})  # an axis with no name
    with pytest.raises(ValueError, match="unnamed dynamic axis"):
        onnx_inputs(tmp_path / "vision.onnx")
