"""Every runtime against torch_ref, over (model family x runtime x weights variant x image size).

Each property is asserted once for every combination: last-token logits within the runtime's tolerance
(tests/parity/conftest.py), greedy tokens identical, forked rollouts equal to independent ones, the
pipeline result identical to torch_ref's (with fixed groundings, so that crops are exercised, and with
the random model's own), and the token accounting of prefix reuse.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from runtimes.protocol import Sampling, Text
from tests.parity.models import SUFFIX_LOGITS, Case, cases, family_of, last_logits
from tests.parity.pipelines import assert_reuse_changes_only_the_accounting, pipeline_spec
from tests.support import FixedGrounding, picture, timeless_result


def assert_same_run(case: Case, ours, theirs, prefix_segments, suffix, n: int = 3) -> None:
    """Prefill + generate on both: prefix, suffix and whole-prompt logits close; tokens and counts equal."""
    atol = case.bundle.tolerance.image
    mine, reference = (
        ours.prefill(prefix_segments, case.variant),
        theirs.prefill(prefix_segments, case.variant),
    )
    assert mine.token_ids == reference.token_ids and mine.next_position == reference.next_position
    np.testing.assert_allclose(last_logits(mine), last_logits(reference), rtol=0, atol=atol)
    np.testing.assert_allclose(
        SUFFIX_LOGITS[case.runtime](ours, mine, suffix),
        SUFFIX_LOGITS["torch_ref"](theirs, reference, suffix),
        rtol=0,
        atol=atol,
    )
    whole_mine = ours.prefill([*prefix_segments, *suffix], case.variant)
    whole_reference = theirs.prefill([*prefix_segments, *suffix], case.variant)
    assert whole_mine.token_ids == whole_reference.token_ids
    np.testing.assert_allclose(last_logits(whole_mine), last_logits(whole_reference), rtol=0, atol=atol)

    sampling = Sampling(case.model.new_tokens)
    got, expected = ours.generate(mine, suffix, n, sampling), theirs.generate(reference, suffix, n, sampling)
    assert all(
        g.generated_tokens == sampling.max_new_tokens and g.finish_reason == "length" for g in expected
    )
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert [(g.prompt_tokens, g.reused_tokens) for g in got] == [
        (g.prompt_tokens, g.reused_tokens) for g in expected
    ]
    # the first sequence computes the suffix, the forks reuse the whole prompt
    assert got[0].prompt_tokens == len(whole_mine.token_ids) - mine.n_tokens
    assert all(g.prompt_tokens == 0 and g.reused_tokens == len(whole_mine.token_ids) for g in got[1:])


@pytest.mark.parametrize("case", cases(variants=True, views=True), ids=str)
def test_image_prompts_match_torch_ref(case: Case, pair) -> None:
    ours, theirs = pair
    family = family_of(ours)
    (width, height), resolution = case.view
    view = family.prepare_image(picture(width, height, seed=1), resolution, f"view{case.view}")
    crop = family.prepare_image(picture(50, 90, seed=3), resolution, "crop")  # an image in the suffix
    suffix = family.question_suffix(case.model.question, [crop])
    assert_same_run(case, ours, theirs, family.image_prefix(view), suffix)


@pytest.mark.parametrize("case", cases(variants=True), ids=str)
def test_text_prompts_match_torch_ref(case: Case, pair) -> None:
    ours, theirs = pair
    segments = [Text("<|im_start|>user\nwhat is on the table?<|im_end|>\n<|im_start|>assistant\n")]
    mine, reference = ours.prefill(segments, case.variant), theirs.prefill(segments, case.variant)
    assert mine.token_ids == reference.token_ids and mine.next_position == reference.next_position
    np.testing.assert_allclose(
        last_logits(mine), last_logits(reference), rtol=0, atol=case.bundle.tolerance.text
    )
    sampling = Sampling(16)
    assert (
        ours.generate(mine, [], 1, sampling)[0].token_ids
        == theirs.generate(reference, [], 1, sampling)[0].token_ids
    )


@pytest.mark.parametrize("case", cases(), ids=str)
def test_view_and_crops_in_one_chunk_match_torch_ref(case: Case, pair) -> None:
    """Crops prefilled in one chunk with the view (how the pipeline runs a family whose images attend to
    each other), and appended in a suffix on top of the cached view."""
    ours, theirs = pair
    family = family_of(ours)
    resolution = case.model.pipeline[0]
    view = family.prepare_image(picture(200, 120, seed=2), resolution, "view")
    crops = [
        family.prepare_image(picture(w, h, seed=3), resolution, f"crop{w}") for w, h in ((90, 60), (50, 110))
    ]
    with_crops = family.question_suffix("What is it?", crops)
    assert_same_run(case, ours, theirs, family.image_prefix(view) + with_crops[:-1], with_crops[-1:], n=2)
    assert_same_run(case, ours, theirs, family.image_prefix(view), with_crops, n=2)


@pytest.mark.parametrize("case", cases(), ids=str)
def test_forked_sampled_rollouts_equal_independent_runs_and_torch_ref(case: Case, pair) -> None:
    ours, theirs = pair
    family = family_of(ours)
    view = family.prepare_image(picture(96, 64), case.model.pipeline[0], "sample")
    prefix_segments, suffix = family.image_prefix(view), family.question_suffix("find the dog")
    sampling = Sampling(12, temperature=1.0, seeds=(5, 6, 7))
    prefix = ours.prefill(prefix_segments, "base")
    batched = ours.generate(prefix, suffix, 3, sampling)
    alone = [ours.generate(prefix, suffix, 1, replace(sampling, seeds=(s,)))[0] for s in sampling.seeds]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # the streams differ
    again = ours.generate(prefix, suffix, 3, sampling)
    assert [g.token_ids for g in again] == [g.token_ids for g in batched]  # the prefix is intact
    expected = theirs.generate(theirs.prefill(prefix_segments, "base"), suffix, 3, sampling)
    assert [g.token_ids for g in batched] == [g.token_ids for g in expected]


@pytest.mark.parametrize("case", cases(), ids=str)
def test_eos_token_ids_are_the_checkpoints(case: Case, pair, request) -> None:
    ours, _ = pair
    checkpoint = request.getfixturevalue(case.model.checkpoint)
    generation = json.loads((Path(checkpoint) / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert sorted(ours.eos_ids) == sorted(eos if isinstance(eos, list) else [eos])


PIPELINES = [
    (case, stages, grounding)
    for case in cases()
    for stages in ("shared", "mixed", "resized")
    for grounding in ("fixed", "model")
    if (stages != "mixed" or "perception" in case.bundle.variants)
    and (grounding == "fixed" or stages != "resized")
]


@pytest.mark.parametrize(("case", "stages", "grounding"), PIPELINES, ids=lambda v: str(v))
def test_pipeline_result_and_token_accounting_match_torch_ref(
    case: Case, stages: str, grounding: str, pair
) -> None:
    ours, theirs = pair
    wrap = FixedGrounding if grounding == "fixed" else (lambda runtime: runtime)
    image = picture(300, 200, seed=3)
    spec = pipeline_spec(case, stages)
    result = timeless_result(spec, wrap(ours), image)
    assert result == timeless_result(spec, wrap(theirs), image)
    if grounding == "fixed":
        perceive, reason = result["stages"][0], result["stages"][-1]
        assert len(result["regions"]) == 2 and result["crops"]
        assert reason["visual_tokens"] > perceive["visual_tokens"]  # view + crops
    assert_reuse_changes_only_the_accounting(case, stages, wrap(ours), image, result)


@pytest.mark.parametrize("case", [c for c in cases(variants=True) if c.variant == "perception"], ids=str)
def test_the_perception_variant_differs_from_base(case: Case, pair) -> None:
    ours, _ = pair
    family = family_of(ours)
    prefix = family.image_prefix(family.prepare_image(picture(96, 96), case.model.pipeline[0], "lora"))
    base, perception = (last_logits(ours.prefill(prefix, variant)) for variant in ("base", "perception"))
    assert np.abs(base - perception).max() > 1e-2
