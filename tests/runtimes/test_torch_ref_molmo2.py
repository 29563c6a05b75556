"""The reference runtime on a tiny random Molmo2, against transformers' own processor code, forward and
generate; and the SPARC pipeline end to end on it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2TokenizerFast

from engine.boxes import Box
from engine.families import family_for
from engine.grounding import Grounding
from engine.pipeline import Pipeline
from engine.spec import validate
from runtimes.protocol import Sampling
from runtimes.torch_ref import TorchRefRuntime
from tests.support import picture


@pytest.fixture(scope="module")
def runtime(tiny_molmo2):
    return TorchRefRuntime(tiny_molmo2, device="cpu")


@pytest.fixture(scope="module")
def family(runtime):
    return family_for(runtime.info.architecture, runtime.info.image)


@pytest.fixture(scope="module")
def hf_model(runtime):
    return AutoModelForImageTextToText.from_pretrained(runtime.model_dir, dtype=torch.float32).eval()


def hf_inputs(runtime, segments):
    """What Molmo2Processor would hand the model for this prompt, from the runtime's tokens and pixels."""
    prompt = runtime._tokenize(segments, 0)
    inputs = runtime.family.forward_inputs(prompt, 0, ())
    inputs.pop("position_ids")  # transformers computes its own
    return prompt, {"input_ids": torch.tensor([prompt.token_ids]), **inputs}


class _Layout:
    """The processor defaults replace_image_token reads (see transformers' Molmo2Processor.__init__)."""

    image_use_col_tokens = True
    use_single_crop_col_tokens = None
    use_single_crop_start_token = True


def test_prompt_tokens_match_the_hf_chat_template_and_processor_layout(runtime, family, tiny_molmo2):
    from transformers.models.molmo2.processing_molmo2 import Molmo2Processor

    image = family.prepare_image(picture(500, 300), 644, "k")
    segments = family.image_prefix(image) + family.question_suffix("Point to the cat.")
    tokenizer = Qwen2TokenizerFast.from_pretrained(tiny_molmo2)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Point to the cat."}]}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Molmo2Processor.__call__ prepends bos_token or, lacking one, eos_token; then expands each <|image|>.
    text = (tokenizer.bos_token or tokenizer.eos_token) + text
    grid = image.extras["image_grids"]
    expanded = Molmo2Processor.replace_image_token(_Layout(), {"image_grids": [grid]}, 0)
    expected = tokenizer(text.replace("<|image|>", expanded), add_special_tokens=False)["input_ids"]
    prompt = runtime._tokenize(segments, 0)
    assert prompt.token_ids == expected
    assert image.n_tokens == len(expanded.split("><"))
    assert int(prompt.image_mask.sum()) == image.extras["image_token_pooling"].shape[0]


def test_view_and_crops_prefilled_together_match_one_full_forward(runtime, family, hf_model):
    # the reason stage's layout: with crops, the engine prefills every image in one chunk (the family's
    # images attend to each other), so the answer's logits equal one forward over the whole prompt
    view = family.prepare_image(picture(320, 200), 512, "view")
    crops = [family.prepare_image(picture(90, 60, seed=s), 512, f"crop{s}") for s in (1, 2)]
    suffix = family.question_suffix("what is the cat doing?", crops)
    _, inputs = hf_inputs(runtime, family.image_prefix(view) + suffix)
    with torch.inference_mode():
        expected = hf_model(**inputs).logits[0, -1].numpy()
    prefix = runtime.prefill(family.image_prefix(view) + suffix[:-1], "base")
    cache, _ = prefix.state
    prompt = runtime._tokenize(suffix[-1:], prefix.next_position)
    got = runtime._forward("base", prompt, copy.deepcopy(cache), prefix.n_tokens, prefix.token_ids)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("size", "resolution"), [((64, 64), 512), ((500, 300), 644)])
def test_prefill_then_suffix_logits_match_one_full_forward(runtime, family, hf_model, size, resolution):
    image = family.prepare_image(picture(*size), resolution, f"img{size}")
    prefix_segments = family.image_prefix(image)
    suffix = family.question_suffix("what colour is the box?")
    _, inputs = hf_inputs(runtime, prefix_segments + suffix)
    with torch.inference_mode():
        expected = hf_model(**inputs).logits[0, -1].numpy()
        without_block = hf_model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    prefix = runtime.prefill(prefix_segments, "base")
    cache, _ = prefix.state
    prompt = runtime._tokenize(suffix, prefix.next_position)
    got = runtime._forward("base", prompt, copy.deepcopy(cache), prefix.n_tokens, prefix.token_ids)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    # the bidirectional image block matters: a purely causal prefill gives other logits
    assert np.abs(without_block.logits[0, -1].numpy() - expected).max() > 1e-3


@pytest.mark.parametrize(("size", "resolution"), [((64, 64), 512), ((300, 500), 644)])
def test_greedy_tokens_equal_hf_generate_and_batched_rollouts_agree(
    runtime, family, hf_model, size, resolution
):
    image = family.prepare_image(picture(*size, seed=2), resolution, f"gen{size}")
    prefix_segments = family.image_prefix(image)
    suffix = family.question_suffix("Point to the dog.")
    _, inputs = hf_inputs(runtime, prefix_segments + suffix)
    with torch.inference_mode():
        reference = hf_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = reference[0, inputs["input_ids"].shape[1] :].tolist()
    generations = runtime.generate(runtime.prefill(prefix_segments, "base"), suffix, 4, Sampling(16))
    assert len(expected) >= 2
    assert [g.token_ids for g in generations] == [expected] * 4


def test_sampled_rollouts_batched_equal_one_by_one(runtime, family):
    image = family.prepare_image(picture(96, 64), 512, "sample")
    prefix = runtime.prefill(family.image_prefix(image), "base")
    suffix = family.question_suffix("find the dog")
    seeds = (5, 6, 7)
    batched = runtime.generate(prefix, suffix, 3, Sampling(12, temperature=1.0, seeds=seeds))
    alone = [runtime.generate(prefix, suffix, 1, Sampling(12, temperature=1.0, seeds=(s,)))[0] for s in seeds]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in batched}) > 1  # the streams differ


def molmo_spec(bundle, reuse: bool, rollouts: int = 2):
    return validate(
        {
            "model": {"bundle": str(bundle), "runtime": "torch_ref", "device": "cpu"},
            "reuse_prefix": reuse,
            "stages": [
                {
                    "perceive": {
                        "resolution": 512,
                        "rollouts": rollouts,
                        "temperature": 0.0,
                        "max_new_tokens": 12,
                    }
                },
                {"fuse": {"iou_thr": 0.5}},
                {"crop": {"min_side": 64, "resolution": 378, "max_crops": 2}},
                {"reason": {"resolution": 512, "max_new_tokens": 12}},
            ],
        }
    )


def _as_tuple(result):
    return (result.answer, [(r.box, r.score) for r in result.regions], result.crops)


def test_pipeline_end_to_end_same_result_with_and_without_prefix_reuse(runtime, tiny_molmo2):
    # A random model writes no points; a fixed grounding makes the crops (and multi-image chunks) happen.
    fixed = Grounding((Box(0.1, 0.1, 0.4, 0.5, "cat"), Box(0.6, 0.5, 0.9, 0.9, "dog")), ())
    image, question = picture(400, 300, seed=4), "What is the cat doing?"
    results = []
    for reuse in (True, False):
        pipeline = Pipeline(molmo_spec(tiny_molmo2, reuse), runtime)
        pipeline.family.parse_grounding = lambda *_: fixed
        results.append(pipeline.run(image, question))
    with_reuse, without = results
    assert _as_tuple(with_reuse) == _as_tuple(without)
    assert len(with_reuse.crops) == 2 and with_reuse.answer
    assert with_reuse.stages[3].visual_tokens > with_reuse.stages[0].visual_tokens  # view + crops
    assert with_reuse.stages[0].reused_tokens > 0  # rollouts forked from one prefill
    # image tokens attend to each other across images: the crops join the view in one chunk, no reuse
    assert with_reuse.stages[3].reused_tokens == 0


def test_pipeline_parses_real_points_text(runtime, tiny_molmo2):
    pipeline = Pipeline(molmo_spec(tiny_molmo2, True, rollouts=1), runtime)
    grounding = pipeline.family.parse_grounding('<points coords="1 1 500 500">cat</points>')
    assert grounding.boxes == (Box(0.45, 0.45, 0.55, 0.55, "cat"),)


@pytest.mark.parametrize("name", ["molmo2-sparc.yaml", "molmo2-sparc-wbf8.yaml"])
def test_shipped_molmo2_specs_run_on_the_tiny_model(tiny_molmo2, tmp_path, name, capsys):
    from engine.cli import main

    specs = Path(__file__).parents[2] / "specs"
    image = tmp_path / "image.png"
    picture(320, 240, seed=5).save(image)
    overrides = [f"model.bundle={tiny_molmo2}", "model.device=cpu", "stages.0.perceive.max_new_tokens=8"]
    overrides += ["stages.3.reason.max_new_tokens=4"]
    args = ["run", str(specs / name), "--image", str(image), "--question", "Where is the cat?", "--json"]
    assert main([*args, *sum((["--set", o] for o in overrides), [])]) == 0
    assert '"answer"' in capsys.readouterr().out
