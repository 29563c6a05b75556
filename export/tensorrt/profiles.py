"""TensorRT optimization profiles: the (min, opt, max) shape of every dynamic graph input, sized from a spec.

A TensorRT engine accepts only shapes inside the profiles it was built with, and tunes its kernels for
the `opt` shape. The sizes follow from what a spec runs, so they are computed here from the spec's
stages and the model's image grid (pure Python: no TensorRT, no GPU).

Sizing rules (Qwen3-VL; units: tokens = LLM positions, patches = 16 px vision patches, 4 per token):

  image tokens   worst case of a resolution R: a square image, each side rounded to the 32 px grid
                 (`fit_to_grid`); R = "full": the model's max_pixels / 32². Every image also takes 2
                 wrapper tokens (<|vision_start|>, <|vision_end|>).
  prompts        perceive = image@R_p + text; reason = image@R_r + crops x crop@R_c + text, where crops =
                 min(fuse.max_regions, crop.max_crops) and text (chat template + prompt + question) is a
                 budget, DEFAULT_TEXT_TOKENS unless given.
  context        max over stages of prompt + max_new_tokens; refused above the model's position limit.

  vision         patches: min = one 32 px cell (merge² patches), opt = the perceive image (the reason
                 image when there is no perceive stage), max = the reason stage's images all in one call.
  prefill        batch 1 (the prompt runs once, then forks); sequence 1 .. longest prompt, opt = the
                 first stage's prompt; past 0 .. longest prompt - 1 (a suffix after a cached prefix);
                 prefix 0 (a prefill has no shared prefix: its past is the whole cache).
  total          prefix + past + sequence at each of min, opt and max, so that every profile point is a
                 set of shapes the graph can run (the mask's length must equal the keys'); prefill's max
                 total is thus 2 x longest - 1 although a real call stays within the longest prompt.
  decode         batch 1 .. max rollouts, opt = max rollouts (the perceive loop is the hot path);
                 sequence 1; prefix (the prompt, shared by the batch) 1 .. longest prompt, opt = the hot
                 stage's prompt; past (each rollout's own tokens) 0 .. most new tokens - 1, opt = half
                 the hot stage's new tokens.

  in place      a decoder with `cache_position` (export/onnx/base.py, every bundle exported now) writes the
                 chunk into its past buffer, so total = prefix + past, and the buffer holds the chunk plus
                 the room for the new tokens. prefill: past (the chunk and its room) 1 .. longest prompt +
                 most new tokens - 1, opt = the first stage's prompt; prefix 0 .. longest prompt - 1 (a
                 suffix reads the cached prompt as the shared prefix). decode: past (the suffix and the
                 new tokens) 1 .. longest prompt + most new tokens - 1, opt = the hot stage's new tokens;
                 batch, sequence and prefix as above.

The profiles name graph axes ("patches", "batch", "sequence", "past", "prefix", "total" = prefix + past +
sequence, or prefix + past in place); the
input names and their static dims come from the ONNX graphs themselves (`onnx_inputs`), so the profiles
follow whatever the ONNX exporter writes, and an axis they do not know fails loudly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.families.qwen3vl.pixels import fit_to_grid
from runtimes.bundle import CACHE_POSITION
from runtimes.protocol import ImageConfig

if TYPE_CHECKING:
    from engine.spec import Spec

Range = tuple[int, int, int]  # (min, opt, max) of one axis
Shape = tuple[int, ...]
Dim = int | str  # a static size, or the name of a dynamic axis
Resolution = int | str  # longest side in pixels, or "full"

DEFAULT_TEXT_TOKENS = 256  # chat template + prompt + question per stage; a longer question would not fit
IMAGE_WRAPPER_TOKENS = 2  # <|vision_start|> and <|vision_end|> around every image (Qwen3-VL)


@dataclass(frozen=True)
class Workload:
    """What a deployment runs: the numbers that bound every shape. Defaults = specs/qwen3vl-sparc-wbf8.yaml."""

    perceive_resolution: Resolution | None = 512  # None: no perceive stage (single-pass baseline)
    rollouts: int = 8  # perceive rollouts decoded together in one batch
    perceive_new_tokens: int = 256
    crops: int = 4  # crops the reason stage sees at most
    crop_resolution: Resolution = 512
    reason_resolution: Resolution = 512
    reason_new_tokens: int = 256
    text_tokens: int = DEFAULT_TEXT_TOKENS

    def __post_init__(self) -> None:
        if self.rollouts < 1 or self.crops < 0 or self.text_tokens < 1 or self.reason_new_tokens < 1:
            raise ValueError(f"workload out of range: {self}")


def workload_from_spec(spec: Spec, text_tokens: int = DEFAULT_TEXT_TOKENS) -> Workload:
    from engine.spec import CropSpec, FuseSpec, PerceiveSpec, ReasonSpec

    perceive, fuse = spec.stage(PerceiveSpec), spec.stage(FuseSpec)
    crop, reason = spec.stage(CropSpec), spec.stage(ReasonSpec)
    crops = min(fuse.max_regions, crop.max_crops) if fuse and crop else 0
    return Workload(
        perceive_resolution=perceive.resolution if perceive else None,
        rollouts=perceive.rollouts if perceive else 1,
        perceive_new_tokens=perceive.max_new_tokens if perceive else 0,
        crops=crops,
        crop_resolution=crop.resolution if crop else 512,
        reason_resolution=reason.resolution,
        reason_new_tokens=reason.max_new_tokens,
        text_tokens=text_tokens,
    )


def image_tokens(resolution: Resolution, image: ImageConfig) -> int:
    """LLM tokens of the largest image a resolution can produce (a square one), wrappers excluded."""
    cell = image.patch_size * image.merge_size  # pixels per token side (32 for Qwen3-VL)
    if resolution == "full":
        return image.max_pixels // (cell * cell)  # any grid-aligned image within max_pixels
    width, height = fit_to_grid(resolution, resolution, resolution, factor=cell, max_pixels=image.max_pixels)
    return (width // cell) * (height // cell)


@dataclass(frozen=True)
class AxisProfile:
    """One optimization profile in graph-axis terms: axis name -> (min, opt, max)."""

    name: str  # vision | prefill | decode
    axes: Mapping[str, Range]

    def covers(self, inputs: Mapping[str, Sequence[Dim]]) -> bool:
        return all(dim in self.axes for dims in inputs.values() for dim in dims if isinstance(dim, str))

    def shapes(self, inputs: Mapping[str, Sequence[Dim]]) -> Profile:
        """The profile of one graph: every input with a dynamic axis gets (min, opt, max) shapes."""
        shapes = {}
        for name, dims in inputs.items():
            if all(isinstance(dim, int) for dim in dims):
                continue  # static inputs need no profile
            unknown = [dim for dim in dims if isinstance(dim, str) and dim not in self.axes]
            if unknown:
                raise ValueError(
                    f"input {name!r} has axes {unknown} that the {self.name} profile does not size "
                    f"(it sizes: {', '.join(self.axes)})"
                )
            shapes[name] = tuple(
                tuple(dim if isinstance(dim, int) else self.axes[dim][k] for dim in dims) for k in range(3)
            )
        return Profile(self.name, shapes)


@dataclass(frozen=True)
class Profile:
    """One optimization profile of one graph: input name -> (min, opt, max) shapes."""

    name: str
    shapes: Mapping[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain lists, for the manifest (yaml.safe_dump writes no tuples)."""
        return {name: [list(shape) for shape in triple] for name, triple in self.shapes.items()}


@dataclass(frozen=True)
class Plan:
    """The axis profiles of a workload, with the token counts they were sized from."""

    vision: AxisProfile
    prefill: AxisProfile
    decode: AxisProfile
    longest_prompt: int  # tokens
    context: int  # tokens: longest prompt + its new tokens, over stages
    in_place_prefill: AxisProfile  # prefill and decode of a decoder that writes its past buffer in place
    in_place_decode: AxisProfile

    def profiles(self, inputs: Mapping[str, Sequence[Dim]]) -> tuple[AxisProfile, ...]:
        """The axis profiles for a graph with these inputs: the in-place ones for such a decoder."""
        if CACHE_POSITION in inputs:
            return (self.vision, self.in_place_prefill, self.in_place_decode)
        return (self.vision, self.prefill, self.decode)


def plan_profiles(workload: Workload, image: ImageConfig, max_positions: int | None = None) -> Plan:
    """Size the vision, prefill and decode profiles of a workload (rules in the module docstring)."""
    w = workload
    tokens = {  # image tokens (wrappers excluded) at each resolution the workload uses
        key: image_tokens(res, image)
        for key, res in (
            ("perceive", w.perceive_resolution),
            ("crop", w.crop_resolution),
            ("reason", w.reason_resolution),
        )
        if res is not None
    }
    reason_images = tokens["reason"] + w.crops * tokens["crop"]
    reason_prompt = reason_images + (1 + w.crops) * IMAGE_WRAPPER_TOKENS + w.text_tokens
    stages = [(reason_prompt, w.reason_new_tokens, 1)]  # (prompt, new tokens, decode batch)
    if w.perceive_resolution is not None:
        stages.insert(
            0, (tokens["perceive"] + IMAGE_WRAPPER_TOKENS + w.text_tokens, w.perceive_new_tokens, w.rollouts)
        )
    longest = max(prompt for prompt, _, _ in stages)
    context = max(prompt + new for prompt, new, _ in stages)
    if max_positions is not None and context > max_positions:
        raise ValueError(
            f"the spec needs a context of {context} tokens (longest prompt {longest} + its new tokens) but the "
            f"model has {max_positions} positions; lower a resolution, the crops or max_new_tokens"
        )

    merge = image.merge_size**2  # patches per token
    first_image = tokens.get("perceive", tokens["reason"])
    vision = AxisProfile(
        "vision", {"patches": (merge, first_image * merge, max(first_image, reason_images) * merge)}
    )

    first_prompt = stages[0][0]
    prefill = AxisProfile(
        "prefill",
        {
            "batch": (1, 1, 1),
            "sequence": (1, first_prompt, longest),
            "past": (0, 0, longest - 1),
            "prefix": (0, 0, 0),
            "total": (1, first_prompt, 2 * longest - 1),  # prefix + past + sequence at every point
        },
    )

    hot_prompt, hot_new, batch = max(stages, key=lambda stage: stage[2])  # most rollouts: the hot loop
    most_new = max(new for _, new, _ in stages)
    decode = AxisProfile(
        "decode",
        {
            "batch": (1, batch, batch),
            "sequence": (1, 1, 1),
            "prefix": (1, hot_prompt, longest),
            "past": (0, hot_new // 2, most_new - 1),
            "total": (2, hot_prompt + hot_new // 2 + 1, longest + most_new),
        },
    )
    buffer = longest + most_new - 1  # the most a past buffer holds: a whole prompt as the suffix, new tokens
    in_place_prefill = AxisProfile(
        "prefill",
        {
            "batch": (1, 1, 1),
            "sequence": (1, first_prompt, longest),
            "past": (1, first_prompt, buffer),
            "prefix": (0, 0, longest - 1),
            "total": (1, first_prompt, longest - 1 + buffer),  # prefix + past at every point
        },
    )
    in_place_decode = AxisProfile(
        "decode",
        {
            "batch": (1, batch, batch),
            "sequence": (1, 1, 1),
            "prefix": (1, hot_prompt, longest),
            "past": (1, hot_new, buffer),
            "total": (2, hot_prompt + hot_new, longest + buffer),
        },
    )
    return Plan(vision, prefill, decode, longest, context, in_place_prefill, in_place_decode)


def graph_profiles(inputs: Mapping[str, Sequence[Dim]], plan: Plan) -> list[Profile]:
    """The profiles of one graph: each axis profile that sizes all its dynamic axes, in plan order.

    The vision graph gets [vision]; the embed and decoder graphs get [prefill, decode].
    """
    matching = [axis.shapes(inputs) for axis in plan.profiles(inputs) if axis.covers(inputs)]
    if not matching:
        dynamic = sorted({dim for dims in inputs.values() for dim in dims if isinstance(dim, str)})
        raise ValueError(
            f"no profile sizes the graph's dynamic axes {dynamic} (known: patches; batch, sequence, past, prefix, total)"
        )
    return matching


def onnx_inputs(path: str | Path) -> dict[str, tuple[Dim, ...]]:
    """The graph inputs of an ONNX file: name -> dims (int, or the dynamic axis's name). Weights not loaded."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    inputs = {}
    for value in model.graph.input:
        if value.name in weights:  # older exporters list weights as inputs too
            continue
        dims = []
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dims.append(dim.dim_param)
            elif dim.HasField("dim_value"):
                dims.append(dim.dim_value)
            else:
                raise ValueError(f"{path}: input {value.name!r} has an unnamed dynamic axis; cannot size it")
        inputs[value.name] = tuple(dims)
    return inputs
