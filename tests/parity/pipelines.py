"""SPARC pipelines the parity suite runs on every runtime: greedy specs, fixed groundings, timeless results."""

from __future__ import annotations

from PIL import Image

from tests.parity.models import Case, family_of
from tests.support import timeless_result


def pipeline_spec(case: Case, stages: str, reuse: bool = True) -> dict:
    """Greedy SPARC, every stage deterministic. `stages`: which KV the reason stage could reuse:
    shared (perceive at the reason stage's view and variant), mixed (perceive on the perception
    variant), resized (perceive at another resolution)."""
    view, other, crop = case.model.pipeline
    perceive = {"resolution": other if stages == "resized" else view, "rollouts": 2, "temperature": 0.0}
    perceive |= {"max_new_tokens": 12, "variant": "perception" if stages == "mixed" else "base"}
    return {
        "model": {"bundle": "unused", "runtime": case.runtime, "device": "cpu"},
        "reuse_prefix": reuse,
        "stages": [
            {"perceive": perceive},
            {"fuse": {"iou_thr": 0.5}},
            {"crop": {"min_side": 32, "resolution": crop, "max_crops": 2}},
            {"reason": {"resolution": view, "max_new_tokens": 12}},
        ],
    }


def assert_reuse_changes_only_the_accounting(
    case: Case, stages: str, runtime, image: Image.Image, result: dict, same_texts: bool = True
) -> None:
    """The same spec without prefix reuse gives the same result; prompt + reused tokens equal the naive
    path's prompt tokens, and the reason stage reuses KV exactly when it can. `same_texts=False`: a runtime
    whose kernels round a prompt split in two differently (llama.cpp with f16 KV and quantized weights) may
    pick other tokens at a near-tie; then only the regions, crops and accounting are compared."""
    naive = timeless_result(pipeline_spec(case, stages, reuse=False), runtime, image)
    assert (naive["regions"], naive["crops"]) == (result["regions"], result["crops"])
    assert naive["answer"] == result["answer"] or not same_texts
    for reused, fresh in zip(result["stages"], naive["stages"], strict=True):
        assert reused["outputs"] == fresh["outputs"] or not same_texts
        assert fresh["reused_tokens"] == 0
        assert reused["prompt_tokens"] + reused["reused_tokens"] == fresh["prompt_tokens"]
    assert result["stages"][0]["reused_tokens"] > 0  # the rollouts fork one prefill
    # the reason stage reuses the perceive stage's view exactly when variant and resolution match, and
    # its crops may follow the cached view (a family whose images attend to each other prefills them together)
    together = family_of(runtime).images_attend_each_other and bool(result["crops"])
    assert (result["stages"][-1]["reused_tokens"] > 0) == (stages == "shared" and not together)
