"""The interpreter: runs a spec's stages in order over one query's context.

    pipeline = Pipeline(spec, runtime)
    result = pipeline.run(image, "What colour is the cat's collar?")

Every model call goes through `generate_on_image`, which puts `[header][image]` first so its KV comes
from the prefix cache: computed once, forked to all rollouts, reused by the reason stage when the
resolution and weights variant match. With `reuse_prefix: false` each rollout re-prefills the image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from PIL import Image as PILImage

from engine.cropping import PixelBox, to_pixels
from engine.errors import QueryRefused, UserError
from engine.families import Family, family_for
from engine.fusion import Region
from engine.grounding import Grounding
from engine.imaging import image_content_hash
from engine.prefix_cache import PrefixCache
from engine.results import RegionResult, Result, StageTrace
from engine.spec import Spec
from engine.stages import run_stage
from runtimes import open_runtime
from runtimes.protocol import Generation, Image, ImageInput, Runtime, RuntimeInputError, Sampling, Segment


@dataclass
class Context:
    image: PILImage.Image  # the original, full-resolution image
    image_hash: str
    question: str
    rollouts: list[Grounding] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)  # normalized boxes + agreement
    crops: list[PixelBox] = field(default_factory=list)  # pixels of the original image
    crop_inputs: list[ImageInput] = field(default_factory=list)
    answer: str = ""
    traces: list[StageTrace] = field(default_factory=list)
    views: dict[int | str, ImageInput] = field(default_factory=dict)  # the image prepared per resolution

    def view(self, pipeline: Pipeline, resolution: int | str) -> ImageInput:
        """The original image at a stage's resolution, prepared once per query (perceive and reason share it)."""
        if resolution not in self.views:
            self.views[resolution] = pipeline.prepare(self.image, resolution, self.image_hash)
        return self.views[resolution]


def open_pipeline(spec: Spec) -> Pipeline:
    options = dict(spec.model.options)
    if spec.model.perception_lora:
        options["perception_lora"] = spec.model.perception_lora
    return Pipeline(spec, open_runtime(spec.model.runtime, spec.model.bundle, spec.model.device, **options))


class Pipeline:
    def __init__(self, spec: Spec, runtime: Runtime) -> None:
        self.spec = spec
        self.runtime = runtime
        self.family: Family = family_for(runtime.info.architecture, runtime.info.image)
        self.prefixes = PrefixCache(runtime, spec.model.prefix_cache if spec.reuse_prefix else 0)
        missing = {s.variant for s in spec.stages if hasattr(s, "variant")} - set(runtime.info.variants)
        if missing:
            raise UserError(
                f"the bundle has no weights variant {', '.join(sorted(missing))!s} named by the spec "
                f"(it has: {', '.join(runtime.info.variants)})"
            )
        self.prompts = spec.prompts.with_defaults(self.family.perceive_prompt, self.family.reason_prompt)

    def run(self, image: PILImage.Image, question: str) -> Result:
        ctx = Context(image=image, image_hash=image_content_hash(image), question=question)
        for index, stage in enumerate(self.spec.stages):
            start = time.perf_counter()
            try:
                trace = run_stage(self, stage, index, ctx)
            except RuntimeInputError as error:
                raise QueryRefused(str(error)) from error
            trace.ms = (time.perf_counter() - start) * 1000
            ctx.traces.append(trace)
        width, height = image.size
        regions = [RegionResult(to_pixels(r.box, width, height), r.score) for r in ctx.regions]
        return Result(answer=ctx.answer, regions=regions, crops=ctx.crops, stages=ctx.traces)

    def prepare(self, image: PILImage.Image, resolution: int | str, key: str) -> ImageInput:
        return self.family.prepare_image(image, None if resolution == "full" else resolution, key)

    def generate_on_image(
        self,
        image: ImageInput,
        suffix: Sequence[Segment],
        sampling: Sampling,
        n: int,
        variant: str,
        trace: StageTrace,
    ) -> list[Generation]:
        """Generate n continuations of [header][image] + suffix, accounting the tokens in `trace`."""
        prefix_segments = self.family.image_prefix(image)
        last_image = max((i for i, s in enumerate(suffix) if isinstance(s, Image)), default=-1)
        if self.family.images_attend_each_other and last_image >= 0:
            # the cached view could not attend to the crops: prefill all images together (no reuse)
            prefix_segments = [*prefix_segments, *suffix[: last_image + 1]]
            suffix = suffix[last_image + 1 :]
        prefix_images, suffix_images = _image_tokens(prefix_segments), _image_tokens(suffix)
        if self.spec.reuse_prefix:
            prefix, fresh = self.prefixes.get(prefix_segments, variant)
            generations = self.runtime.generate(prefix, suffix, n, sampling)
            fresh_tokens = prefix.computed_tokens if fresh else 0
            # the suffix runs once and is then forked: its images are computed once per call
            trace.visual_tokens_computed += (prefix_images if fresh else 0) + suffix_images
        else:
            generations, fresh_tokens = [], 0
            for seed_index in range(n):
                prefix = self.runtime.prefill(prefix_segments, variant)
                one = replace(sampling, seeds=sampling.seeds[seed_index : seed_index + 1])
                generations += self.runtime.generate(prefix, suffix, 1, one)
                fresh_tokens += prefix.computed_tokens
            trace.visual_tokens_computed += n * (prefix_images + suffix_images)
        trace.prompt_tokens += fresh_tokens + sum(g.prompt_tokens for g in generations)
        trace.reused_tokens += sum(g.reused_tokens for g in generations) - fresh_tokens
        trace.generated_tokens += sum(g.generated_tokens for g in generations)
        trace.outputs += [g.text for g in generations]
        return generations


def _image_tokens(segments: Sequence[Segment]) -> int:
    return sum(s.image.n_tokens for s in segments if isinstance(s, Image))
