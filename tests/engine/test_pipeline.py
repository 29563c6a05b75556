"""The interpreter over a scripted runtime: stage order, fusion into regions, crops, token accounting."""

import json

import numpy as np
import pytest
from PIL import Image

from engine.errors import UserError
from engine.pipeline import Pipeline
from engine.spec import validate
from engine.stages import rollout_seeds

CAT = '```json\n[{"bbox_2d": [100, 100, 300, 300], "label": "cat"}]\n```'
CAT_JITTER = '[{"bbox_2d": [110, 95, 305, 290], "label": "cat"}]'
DOG = '[{"bbox_2d": [600, 600, 900, 900], "label": "dog"}]'


def spec(rollouts=4, reuse=True, perceive_resolution=256, reason_resolution=256, variant="base", **fuse):
    return validate(
        {
            "model": {"bundle": "unused"},
            "reuse_prefix": reuse,
            "stages": [
                {"perceive": {"resolution": perceive_resolution, "rollouts": rollouts, "variant": variant}},
                {"fuse": {"iou_thr": 0.5, **fuse}},
                {"crop": {"min_side": 64, "resolution": 128}},
                {"reason": {"resolution": reason_resolution}},
            ],
        }
    )


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))


def test_rollouts_fuse_into_regions_with_agreement(scripted_runtime, image):
    runtime = scripted_runtime([CAT, CAT_JITTER, DOG, "no boxes here"], answer="a cat")
    result = Pipeline(spec(rollouts=4), runtime).run(image, "what animal?")
    assert result.answer == "a cat"
    scores = sorted(r.score for r in result.regions)
    assert scores == [0.25, 0.5]  # the cat in 2 of 4 rollouts, the dog in 1
    cat = max(result.regions, key=lambda r: r.score).box
    assert 36 <= cat.x1 <= 44 and 114 <= cat.x2 <= 122  # ~0.1..0.3 of 400 px
    assert len(result.crops) == 2
    assert [s.name for s in result.stages] == ["perceive", "fuse", "crop", "reason"]
    assert any("rollout 3" in note for note in result.stages[0].notes)
    assert json.loads(json.dumps(result.to_dict()))["regions"][0]["box"] == result.regions[0].box.as_list()


def test_min_agreement_drops_lone_regions(scripted_runtime, image):
    runtime = scripted_runtime([CAT, CAT_JITTER, DOG, ""])
    result = Pipeline(spec(rollouts=4, min_agreement=0.5), runtime).run(image, "q")
    assert [r.score for r in result.regions] == [0.5]


def test_zero_boxes_reason_runs_without_crops(scripted_runtime, image):
    runtime = scripted_runtime(["I see nothing", "{broken"])
    result = Pipeline(spec(rollouts=2), runtime).run(image, "q")
    assert result.regions == [] and result.crops == []
    assert "no regions: the reason stage runs without crops" in result.stages[1].notes
    assert result.stages[3].visual_tokens == 8 * 6  # the 256x192 global view alone, 32 px per token


def test_prefix_computed_once_and_reused_by_rollouts_and_reason(scripted_runtime, image):
    runtime = scripted_runtime([CAT] * 4)
    result = Pipeline(spec(rollouts=4), runtime).run(image, "q")
    perceive, reason = result.stages[0], result.stages[3]
    assert len(runtime.prefills) == 1  # same resolution and variant: one prefix for both stages
    assert runtime.calls[0][0] == 4  # the 4 rollouts in one batched call
    assert perceive.reused_tokens > 0 and reason.reused_tokens > 0
    prefix = reason.reused_tokens
    suffix = perceive.prompt_tokens - prefix
    assert perceive.reused_tokens == 3 * (prefix + suffix)  # 3 forks reuse the whole prompt


def test_visual_tokens_computed_are_the_image_tokens_run_through_the_model(scripted_runtime, image):
    result = Pipeline(spec(rollouts=4), scripted_runtime([CAT] * 4)).run(image, "q")
    perceive, crop, reason = result.stages[0], result.stages[2], result.stages[3]
    assert perceive.visual_tokens_computed == perceive.visual_tokens  # the view, once for 4 rollouts
    assert crop.visual_tokens > 0 and crop.visual_tokens_computed == 0  # crops are only prepared here
    assert reason.visual_tokens_computed == crop.visual_tokens  # the view's KV reused: only crops computed
    naive = Pipeline(spec(rollouts=4, reuse=False), scripted_runtime([CAT] * 4)).run(image, "q")
    assert naive.stages[0].visual_tokens_computed == 4 * perceive.visual_tokens
    assert naive.stages[3].visual_tokens_computed == reason.visual_tokens


def test_no_reuse_prefills_every_rollout(scripted_runtime, image):
    runtime = scripted_runtime([CAT] * 4)
    result = Pipeline(spec(rollouts=4, reuse=False), runtime).run(image, "q")
    assert len(runtime.prefills) == 5  # 4 rollouts + reason
    assert all(n == 1 for n, _ in runtime.calls)
    assert all(stage.reused_tokens == 0 for stage in result.stages)


def test_reuse_across_stages_only_when_resolution_and_variant_match(scripted_runtime, image):
    runtime = scripted_runtime([CAT] * 2)
    result = Pipeline(spec(rollouts=2, reason_resolution=384), runtime).run(image, "q")
    assert len(runtime.prefills) == 2
    assert result.stages[3].reused_tokens == 0
    runtime = scripted_runtime([CAT] * 2, variants=("base", "perception"))
    result = Pipeline(spec(rollouts=2, variant="perception"), runtime).run(image, "q")
    assert len(runtime.prefills) == 2 and result.stages[3].reused_tokens == 0


def test_a_new_image_never_reuses_stale_kv(scripted_runtime, image):
    runtime = scripted_runtime([CAT] * 6)
    pipeline = Pipeline(spec(rollouts=2), runtime)
    first = pipeline.run(image, "q")
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    second = pipeline.run(flipped, "q")
    assert len(runtime.prefills) == 2 and runtime.prefills[0] != runtime.prefills[1]
    assert second.stages[0].prompt_tokens == first.stages[0].prompt_tokens  # the new prefix was computed
    again = pipeline.run(image, "q")  # the first image again: its prefix is still cached
    assert len(runtime.prefills) == 2
    assert again.stages[0].prompt_tokens < first.stages[0].prompt_tokens


def test_missing_variant_is_refused_before_any_work(scripted_runtime):
    runtime = scripted_runtime([])
    with pytest.raises(UserError, match="no weights variant perception"):
        Pipeline(spec(variant="perception"), runtime)
    assert runtime.prefills == []


def test_rollout_seeds_are_distinct_and_reproducible():
    assert rollout_seeds(0, 0, 8) == rollout_seeds(0, 0, 8)
    assert len(set(rollout_seeds(0, 0, 8))) == 8
    assert rollout_seeds(0, 0, 4) == rollout_seeds(0, 0, 8)[:4]
    assert rollout_seeds(1, 0, 4) != rollout_seeds(0, 0, 4)


def test_reference_runtime_reuse_changes_only_the_accounting(tiny_qwen3vl, image):
    from runtimes.torch_ref import TorchRefRuntime

    runtime = TorchRefRuntime(tiny_qwen3vl, device="cpu")
    results = {}
    for reuse in (True, False):
        sampled = {
            "model": {"bundle": str(tiny_qwen3vl)},
            "reuse_prefix": reuse,
            "stages": [
                {"perceive": {"resolution": 256, "rollouts": 3, "temperature": 1.0, "max_new_tokens": 12}},
                {"fuse": {}},
                {"crop": {"min_side": 64, "resolution": 128}},
                {"reason": {"resolution": 256, "max_new_tokens": 8}},
            ],
        }
        results[reuse] = Pipeline(validate(sampled), runtime).run(image, "where is the cat?")
    reused, naive = results[True], results[False]
    assert reused.answer == naive.answer
    assert reused.stages[0].outputs == naive.stages[0].outputs  # same seeded streams, batched or not
    assert len(set(reused.stages[0].outputs)) > 1  # the rollouts were sampled, not copies
    assert all(s.reused_tokens == 0 for s in naive.stages)
    assert reused.stages[0].reused_tokens > 0 and reused.stages[3].reused_tokens > 0
    total = [s.prompt_tokens + s.reused_tokens for s in reused.stages]
    assert total == [s.prompt_tokens for s in naive.stages]


def test_runtime_options_are_checked_against_the_runtime(tiny_qwen3vl):
    from engine.pipeline import open_pipeline
    from runtimes.protocol import RuntimeInputError

    raw = {"model": {"bundle": str(tiny_qwen3vl), "options": {"n_ctx": 4096}}, "stages": [{"reason": {}}]}
    with pytest.raises(
        RuntimeInputError, match="runtime 'torch_ref' takes no option n_ctx .it takes: perception_lora"
    ):
        open_pipeline(validate(raw))


def test_the_view_is_prepared_once_when_stages_share_a_resolution(scripted_runtime, image, monkeypatch):
    pipeline = Pipeline(spec(rollouts=2), scripted_runtime([CAT] * 2))
    prepared = []
    original = pipeline.family.prepare_image
    monkeypatch.setattr(
        pipeline.family, "prepare_image", lambda *args: prepared.append(args[1]) or original(*args)
    )
    pipeline.run(image, "q")
    assert prepared.count(256) == 1  # perceive and reason both at 256 px: one preparation
