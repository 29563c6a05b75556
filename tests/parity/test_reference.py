"""torch_ref, the oracle every other runtime is compared with, against transformers' own forward and
generate, for every model of the parity suite (tests/parity/conftest.py)."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from runtimes.protocol import Sampling
from tests.parity.models import MODELS, Case, Model, family_of, open_reference
from tests.parity.pipelines import assert_reuse_changes_only_the_accounting, pipeline_spec
from tests.support import FixedGrounding, picture, timeless_result

ATOL = 1e-4  # torch_ref's KV-cached chunks against one transformers forward: ~1e-6 measured


@pytest.fixture
def reference(request: pytest.FixtureRequest, opened: dict, model: Model):
    return open_reference(request, opened, model)


@pytest.fixture
def hf_model(reference):
    return AutoModelForImageTextToText.from_pretrained(reference.model_dir, dtype=torch.float32).eval()


def hf_inputs(reference, segments) -> dict:
    """What the model's processor would hand transformers for this prompt, from torch_ref's tokens and
    pixels; transformers computes the positions itself."""
    prompt = reference._tokenize(segments, 0)
    ids = torch.tensor([prompt.token_ids])
    inputs = reference.family.forward_inputs(prompt, 0, ())
    inputs.pop("position_ids")
    inputs.setdefault("mm_token_type_ids", (ids == reference.family.image_token_id).int())
    return {"input_ids": ids, **inputs}


def views(model: Model):
    return [pytest.param(model, view, id=f"{model.name}-{view[0][0]}x{view[0][1]}") for view in model.views]


@pytest.mark.parametrize(("model", "view"), [p for m in MODELS for p in views(m)])
def test_prefill_then_suffix_logits_match_one_full_forward(model: Model, view, reference, hf_model) -> None:
    family = family_of(reference)
    (width, height), resolution = view
    prefix_segments = family.image_prefix(
        family.prepare_image(picture(width, height), resolution, f"img{view}")
    )
    suffix = family.question_suffix("what colour is the box?")
    with torch.inference_mode():
        expected = hf_model(**hf_inputs(reference, prefix_segments + suffix)).logits[0, -1].numpy()
    prefix = reference.prefill(prefix_segments, "base")
    prompt = reference._tokenize(suffix, prefix.next_position)
    cache = copy.deepcopy(prefix.state[0])
    got = reference._forward("base", prompt, cache, prefix.n_tokens, prefix.token_ids)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_view_and_crops_prefilled_together_match_one_full_forward(model: Model, reference, hf_model) -> None:
    # the reason stage's layout where images attend to each other: every image in one chunk, so the
    # answer's logits equal one forward over the whole prompt
    family = family_of(reference)
    resolution = model.pipeline[0]
    view = family.prepare_image(picture(320, 200), resolution, "view")
    crops = [family.prepare_image(picture(90, 60, seed=s), resolution, f"crop{s}") for s in (1, 2)]
    suffix = family.question_suffix("what is the cat doing?", crops)
    with torch.inference_mode():
        expected = hf_model(**hf_inputs(reference, family.image_prefix(view) + suffix)).logits[0, -1].numpy()
    prefix = reference.prefill(family.image_prefix(view) + suffix[:-1], "base")
    prompt = reference._tokenize(suffix[-1:], prefix.next_position)
    got = reference._forward(
        "base", prompt, copy.deepcopy(prefix.state[0]), prefix.n_tokens, prefix.token_ids
    )
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize(("model", "view"), [p for m in MODELS for p in views(m)])
def test_batched_greedy_rollouts_equal_transformers_generate(model: Model, view, reference, hf_model) -> None:
    family = family_of(reference)
    (width, height), resolution = view
    image = family.prepare_image(picture(width, height, seed=2), resolution, f"gen{view}")
    prefix_segments, suffix = family.image_prefix(image), family.question_suffix(model.question)
    inputs = hf_inputs(reference, prefix_segments + suffix)
    with torch.inference_mode():
        generated = hf_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = generated[0, inputs["input_ids"].shape[1] :].tolist()
    generations = reference.generate(reference.prefill(prefix_segments, "base"), suffix, 4, Sampling(16))
    assert len(expected) >= 2
    assert [g.token_ids for g in generations] == [expected] * 4


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_sampled_rollouts_batched_equal_one_by_one_and_the_prefix_is_kept(model: Model, reference) -> None:
    family = family_of(reference)
    prefix = reference.prefill(
        family.image_prefix(family.prepare_image(picture(96, 64), model.pipeline[0], "s")), "base"
    )
    suffix = family.question_suffix("find the dog")
    sampling = Sampling(12, temperature=1.0, seeds=(5, 6, 7))
    batched = reference.generate(prefix, suffix, 3, sampling)
    alone = [reference.generate(prefix, suffix, 1, replace(sampling, seeds=(s,)))[0] for s in sampling.seeds]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # the streams differ
    assert [g.token_ids for g in reference.generate(prefix, suffix, 3, sampling)] == [
        g.token_ids for g in batched
    ]
    greedy = reference.generate(prefix, suffix, 2, Sampling(8))
    assert greedy[0].prompt_tokens == len(reference._tokenize(suffix, 0).token_ids)
    assert (
        greedy[1].prompt_tokens == 0 and greedy[1].reused_tokens == prefix.n_tokens + greedy[0].prompt_tokens
    )


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_pipeline_reuse_changes_only_the_accounting(model: Model, reference) -> None:
    """The other runtimes' pipelines are checked against this one's in test_runtimes.py, with reuse on
    and off: here torch_ref's own reuse, with the stages sharing the view."""
    stages = "shared"
    case, image = Case(model, "torch_ref"), picture(400, 300, seed=4)
    runtime = FixedGrounding(reference)
    result = timeless_result(pipeline_spec(case, stages), runtime, image)
    assert len(result["crops"]) == 2 and result["answer"]
    assert_reuse_changes_only_the_accounting(case, stages, runtime, image, result)
