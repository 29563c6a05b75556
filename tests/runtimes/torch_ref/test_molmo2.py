"""Molmo2 in the reference runtime: prompts as transformers' chat template and processor lay them out, the
bidirectional image block, and the shipped Molmo2 specs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2TokenizerFast

from engine.families import family_for
from runtimes.torch_ref import TorchRefRuntime
from tests.support import picture


@pytest.fixture(scope="module")
def runtime(tiny_molmo2):
    return TorchRefRuntime(tiny_molmo2, device="cpu")


@pytest.fixture(scope="module")
def family(runtime):
    return family_for(runtime.info.architecture, runtime.info.image)


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


def test_the_bidirectional_image_block_matters(runtime, family, tiny_molmo2):
    """A purely causal prefill gives other logits: the image tokens' mutual attention is really exercised."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_molmo2, dtype=torch.float32).eval()
    image = family.prepare_image(picture(500, 300), 644, "block")
    segments = family.image_prefix(image) + family.question_suffix("what colour is the box?")
    prompt = runtime._tokenize(segments, 0)
    inputs = runtime.family.forward_inputs(prompt, 0, ())
    inputs.pop("position_ids")
    ids = torch.tensor([prompt.token_ids])
    with torch.inference_mode():
        with_block = model(input_ids=ids, **inputs).logits[0, -1].numpy()
        inputs.pop("mm_token_type_ids")
        causal = model(input_ids=ids, **inputs).logits[0, -1].numpy()
    prefix = runtime.prefill(family.image_prefix(image), "base")
    suffix = runtime._tokenize(segments[len(family.image_prefix(image)) :], prefix.next_position)
    got = runtime._forward("base", suffix, copy.deepcopy(prefix.state[0]), prefix.n_tokens, prefix.token_ids)
    np.testing.assert_allclose(got, with_block, atol=1e-4, rtol=1e-4)
    assert np.abs(causal - with_block).max() > 1e-3


@pytest.mark.parametrize("name", ["molmo2-sparc.yaml", "molmo2-sparc-wbf8.yaml"])
def test_shipped_molmo2_specs_run_on_the_tiny_model(tiny_molmo2, tmp_path, name, capsys):
    from engine.cli import main

    specs = Path(__file__).parents[3] / "specs"
    image = tmp_path / "image.png"
    picture(320, 240, seed=5).save(image)
    overrides = [f"model.bundle={tiny_molmo2}", "model.device=cpu", "stages.0.perceive.max_new_tokens=8"]
    overrides += ["stages.3.reason.max_new_tokens=4"]
    args = ["run", str(specs / name), "--image", str(image), "--question", "Where is the cat?", "--json"]
    assert main([*args, *sum((["--set", o] for o in overrides), [])]) == 0
    assert '"answer"' in capsys.readouterr().out
