"""SPARC pipelines the parity suite runs on every runtime: greedy specs, fixed groundings, timeless results."""

from __future__ import annotations

from dataclasses import replace

from PIL import Image

from engine.boxes import Box
from engine.pipeline import Pipeline
from engine.spec import validate
from runtimes.protocol import Text
from tests.parity.conftest import Case, family_of

BOXES = (Box(0.1, 0.15, 0.4, 0.5, "a"), Box(0.6, 0.1, 0.9, 0.3, "b"))


class FixedGrounding:
    """Delegates to a real runtime but answers the perceive prompt with the family's own grounding of
    BOXES, so that a random model's pipeline gets regions and the reason stage runs on crops."""

    def __init__(self, inner) -> None:
        self.inner, self.info, self.eos_ids = inner, inner.info, inner.eos_ids
        family = family_of(inner)
        self.marker = family.perceive_prompt.split("{question}")[-1].format().strip()  # only perceive has it
        self.grounding = family.grounding_target(BOXES)

    def prefill(self, segments, variant):
        return self.inner.prefill(segments, variant)

    def generate(self, prefix, suffix, n, sampling):
        generations = self.inner.generate(prefix, suffix, n, sampling)
        if any(self.marker in s.text for s in suffix if isinstance(s, Text)):
            generations = [replace(g, text=self.grounding) for g in generations]
        return generations

    def close(self) -> None:
        pass


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


def timeless_result(spec: dict, runtime, image: Image.Image) -> dict:
    """A pipeline run's --json result with every stage's outputs and without wall times: what two runtimes
    must agree on exactly."""
    result = Pipeline(validate(spec), runtime).run(image, "What colour is the car?")
    timeless = result.to_dict()
    for stage, trace in zip(timeless["stages"], result.stages, strict=True):
        stage.pop("ms")
        stage["outputs"] = trace.outputs
    return timeless


def assert_reuse_changes_only_the_accounting(
    case: Case, stages: str, runtime, image: Image.Image, result: dict
) -> None:
    """The same spec without prefix reuse gives the same result; prompt + reused tokens equal the naive
    path's prompt tokens, and the reason stage reuses KV exactly when it can."""
    naive = timeless_result(pipeline_spec(case, stages, reuse=False), runtime, image)
    assert (naive["answer"], naive["regions"], naive["crops"]) == (
        result["answer"],
        result["regions"],
        result["crops"],
    )
    for reused, fresh in zip(result["stages"], naive["stages"], strict=True):
        assert reused["outputs"] == fresh["outputs"] and fresh["reused_tokens"] == 0
        assert reused["prompt_tokens"] + reused["reused_tokens"] == fresh["prompt_tokens"]
    assert result["stages"][0]["reused_tokens"] > 0  # the rollouts fork one prefill
    # the reason stage reuses the perceive stage's view exactly when variant and resolution match, and
    # its crops may follow the cached view (a family whose images attend to each other prefills them together)
    together = family_of(runtime).images_attend_each_other and bool(result["crops"])
    assert (result["stages"][-1]["reused_tokens"] > 0) == (stages == "shared" and not together)
