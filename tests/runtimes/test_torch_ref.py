"""The reference runtime against transformers' own generate/forward on a tiny random Qwen3-VL."""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from engine.families import family_for
from runtimes.mrope import tokenize
from runtimes.protocol import RuntimeInputError, Sampling, Text
from runtimes.torch_ref import TorchRefRuntime
from tests.support import picture


@pytest.fixture(scope="module")
def runtime(tiny_qwen3vl):
    return TorchRefRuntime(tiny_qwen3vl, device="cpu")


@pytest.fixture(scope="module")
def family(runtime):
    return family_for(runtime.info.architecture, runtime.info.image)


def hf_inputs(runtime, segments):
    prompt = tokenize(runtime.tokenizer, segments, image_token_id=runtime.image_token_id, merge_size=2)
    ids = torch.tensor([prompt.token_ids])
    kwargs = {"input_ids": ids, "mm_token_type_ids": (ids == runtime.image_token_id).int()}
    if prompt.images:
        kwargs["pixel_values"] = torch.from_numpy(np.concatenate([i.pixel_values for i in prompt.images]))
        kwargs["image_grid_thw"] = torch.tensor([i.grid_thw for i in prompt.images])
    return prompt, kwargs


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (200, 72)])
def test_positions_match_transformers_rope_index(runtime, family, size):
    image = family.prepare_image(picture(*size), None, "k")
    crop = family.prepare_image(picture(50, 90, seed=1), None, "c")
    segments = family.image_prefix(image) + family.question_suffix("where is the cat?", [crop])
    prompt, kwargs = hf_inputs(runtime, segments)
    model = runtime.model("base")
    positions, delta = model.model.get_rope_index(
        kwargs["input_ids"], kwargs["mm_token_type_ids"], image_grid_thw=kwargs["image_grid_thw"]
    )
    assert np.array_equal(prompt.positions, positions[:, 0].numpy())
    assert prompt.next_position == len(prompt.token_ids) + int(delta)


@pytest.mark.parametrize("size", [(64, 64), (128, 64), (48, 112)])
def test_prefill_then_suffix_logits_match_one_full_forward(runtime, family, size):
    image = family.prepare_image(picture(*size), None, f"img{size}")
    prefix_segments = family.image_prefix(image)
    suffix = family.question_suffix("what colour is the box?")
    _, kwargs = hf_inputs(runtime, prefix_segments + suffix)
    with torch.inference_mode():
        expected = runtime.model("base")(**kwargs).logits[0, -1].numpy()
    prefix = runtime.prefill(prefix_segments, "base")
    cache, _ = prefix.state
    prompt = runtime._tokenize(suffix, prefix.next_position)
    got = runtime._forward("base", prompt, copy.deepcopy(cache), prefix.n_tokens)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (160, 96)])
def test_batched_rollouts_from_a_shared_prefix_equal_independent_generate_calls(runtime, family, size):
    image = family.prepare_image(picture(*size), None, f"gen{size}")
    prefix_segments = family.image_prefix(image)
    suffix = family.question_suffix("find the dog")
    _, kwargs = hf_inputs(runtime, prefix_segments + suffix)
    model = AutoModelForImageTextToText.from_pretrained(runtime.model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        reference = model.generate(**kwargs, max_new_tokens=16, do_sample=False)
    expected = reference[0, kwargs["input_ids"].shape[1] :].tolist()
    generations = runtime.generate(runtime.prefill(prefix_segments, "base"), suffix, 4, Sampling(16))
    assert len(expected) >= 2
    assert [g.token_ids for g in generations] == [expected] * 4


def test_sampled_rollouts_batched_equal_one_by_one(runtime, family):
    image = family.prepare_image(picture(96, 64), None, "sample")
    prefix = runtime.prefill(family.image_prefix(image), "base")
    suffix = family.question_suffix("find the dog")
    seeds = (5, 6, 7)
    batched = runtime.generate(prefix, suffix, 3, Sampling(12, temperature=1.0, seeds=seeds))
    alone = [runtime.generate(prefix, suffix, 1, Sampling(12, temperature=1.0, seeds=(s,)))[0] for s in seeds]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # the streams differ


def test_prefix_is_not_mutated_by_generate(runtime, family):
    image = family.prepare_image(picture(64, 96), None, "mut")
    prefix = runtime.prefill(family.image_prefix(image), "base")
    suffix = family.question_suffix("q")
    first = runtime.generate(prefix, suffix, 2, Sampling(8))
    second = runtime.generate(prefix, suffix, 2, Sampling(8))
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert first[0].prompt_tokens == len(runtime._tokenize(suffix, 0).token_ids)
    assert first[1].prompt_tokens == 0 and first[1].reused_tokens == prefix.n_tokens + first[0].prompt_tokens


def test_unknown_variant_is_refused(runtime):
    with pytest.raises(RuntimeInputError, match="variant 'perception' is not available"):
        runtime.prefill([Text("hi")], "perception")
