"""The four stages. Each reads what earlier stages left in the context and adds its own part.

perceive: low-res image -> N sampled localizations (rollouts) -> boxes per rollout
fuse:     WBF over the rollouts -> regions with an agreement score
crop:     regions -> padded pixel boxes on the original image -> crops prepared for the model
reason:   [global view][crops][question] -> the answer
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from engine.cropping import crop_image
from engine.fusion import fuse_rollouts
from engine.results import StageTrace
from engine.spec import CropSpec, FuseSpec, PerceiveSpec, ReasonSpec, StageSpec
from runtimes.protocol import Sampling

if TYPE_CHECKING:
    from engine.pipeline import Context, Pipeline

StageRunner = Callable[["Pipeline", StageSpec, int, "Context"], StageTrace]
_RUNNERS: dict[type[StageSpec], StageRunner] = {}


def _runs(spec_type: type[StageSpec]) -> Callable[[StageRunner], StageRunner]:
    def register(runner: StageRunner) -> StageRunner:
        _RUNNERS[spec_type] = runner
        return runner

    return register


def run_stage(pipeline: Pipeline, stage: StageSpec, index: int, ctx: Context) -> StageTrace:
    return _RUNNERS[type(stage)](pipeline, stage, index, ctx)


def rollout_seeds(seed: int, stage_index: int, n: int) -> tuple[int, ...]:
    """One independent random stream per rollout, the same whether rollouts run batched or one by one."""
    return tuple(int(s) for s in np.random.SeedSequence([seed, stage_index]).generate_state(n))


def _sampling(pipeline: Pipeline, stage: PerceiveSpec | ReasonSpec, index: int, n: int) -> Sampling:
    seeds = rollout_seeds(pipeline.spec.seed, index, n)
    return Sampling(stage.max_new_tokens, stage.temperature, stage.top_p, seeds)


@_runs(PerceiveSpec)
def perceive(pipeline: Pipeline, stage: PerceiveSpec, index: int, ctx: Context) -> StageTrace:
    trace = StageTrace("perceive")
    image = ctx.view(pipeline, stage.resolution)
    trace.visual_tokens = image.n_tokens
    suffix = pipeline.family.question_suffix(pipeline.prompts["perceive"].format(question=ctx.question))
    sampling = _sampling(pipeline, stage, index, stage.rollouts)
    generations = pipeline.generate_on_image(image, suffix, sampling, stage.rollouts, stage.variant, trace)
    for rollout, generation in enumerate(generations):
        grounding = pipeline.family.parse_grounding(generation.text, stage.point_box_size)
        ctx.rollouts.append(grounding)
        trace.notes += [f"rollout {rollout}: {note}" for note in grounding.notes]
    return trace


@_runs(FuseSpec)
def fuse(pipeline: Pipeline, stage: FuseSpec, index: int, ctx: Context) -> StageTrace:
    trace = StageTrace("fuse")
    ctx.regions = fuse_rollouts(
        [g.boxes for g in ctx.rollouts],
        iou_thr=stage.iou_thr,
        skip_box_thr=stage.skip_box_thr,
        conf_type=stage.conf_type,
        min_agreement=stage.min_agreement,
        max_regions=stage.max_regions,
    )
    if not ctx.regions:
        trace.notes.append("no regions: the reason stage runs without crops")
    return trace


@_runs(CropSpec)
def crop(pipeline: Pipeline, stage: CropSpec, index: int, ctx: Context) -> StageTrace:
    trace = StageTrace("crop")
    width, height = ctx.image.size
    boxes = [region.box for region in ctx.regions]
    ctx.crops = stage.plan(boxes, width, height)
    for box in ctx.crops:
        crop_key = f"{ctx.image_hash}[{box.x1},{box.y1},{box.x2},{box.y2}]"
        ctx.crop_inputs.append(pipeline.prepare(crop_image(ctx.image, box), stage.resolution, crop_key))
    trace.visual_tokens = sum(c.n_tokens for c in ctx.crop_inputs)
    if not ctx.crops:
        trace.notes.append("no crops")
    return trace


@_runs(ReasonSpec)
def reason(pipeline: Pipeline, stage: ReasonSpec, index: int, ctx: Context) -> StageTrace:
    trace = StageTrace("reason")
    image = ctx.view(pipeline, stage.resolution)
    trace.visual_tokens = image.n_tokens + sum(c.n_tokens for c in ctx.crop_inputs)
    prompt = pipeline.prompts["reason"].format(question=ctx.question)
    suffix = pipeline.family.question_suffix(prompt, ctx.crop_inputs)
    sampling = _sampling(pipeline, stage, index, 1)
    (answer,) = pipeline.generate_on_image(image, suffix, sampling, 1, stage.variant, trace)
    ctx.answer = answer.text.strip()
    return trace
