"""Pipeline specs: YAML parsed, overridden, validated onto typed objects, in three separate steps.

    raw = read_yaml(path)                   # parse
    raw = apply_overrides(raw, ["stages.0.perceive.rollouts=4"])
    spec = validate(raw)                    # every problem at once, each with its key path

A spec is refused before any model loads: unknown keys and out-of-range values name their key path, the
value given and what is allowed (SpecError, exit code 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.boxes import Box
from engine.cropping import PixelBox, plan_crops
from engine.errors import SpecError
from engine.fusion import CONF_TYPES
from runtimes import RUNTIMES

Resolution = int | Literal["full"]  # longest side in pixels after resizing, or the native size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_resolution(value: Any) -> Any:
    if value == "full" or (isinstance(value, int) and not isinstance(value, bool) and value >= 32):
        return value
    raise ValueError("must be an integer >= 32 (pixels, longest side) or 'full'")


def _one_of(allowed: Sequence[str]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of: {', '.join(allowed)}")
        return value

    return AfterValidator(check)


class ModelSpec(_Strict):
    bundle: str  # exported bundle directory, or a Hugging Face checkpoint directory for runtime torch_ref
    runtime: Annotated[str, _one_of(sorted(RUNTIMES))] = "torch_ref"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    perception_lora: str | None = None  # torch_ref only: a PEFT adapter merged into the 'perception' variant
    prefix_cache: int = Field(4, ge=0, le=64)  # prefixes (image KV) kept for reuse across stages and queries
    # runtime-specific constructor options, checked against the runtime when it opens,
    # e.g. llamacpp: {n_ctx: 16384, prefix_slots: 16, max_rollouts: 64, n_threads: 4}
    options: dict[str, int | float | bool | str] = {}

    @model_validator(mode="after")
    def _lora_only_for_torch_ref(self) -> ModelSpec:
        if self.perception_lora and self.runtime != "torch_ref":
            raise ValueError("perception_lora applies to runtime torch_ref; bundles carry a merged variant")
        return self


class StageSpec(_Strict):
    name: ClassVar[str]


class PerceiveSpec(StageSpec):
    name: ClassVar[str] = "perceive"
    resolution: Resolution = 512  # low-resolution view the model localizes on
    rollouts: int = Field(1, ge=1, le=64)  # sampled localizations fused by the next stage
    temperature: float = Field(0.7, ge=0.0, le=2.0)  # 0 = greedy (all rollouts then agree)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1, le=8192)
    variant: str = "base"  # weights variant: 'perception' = perception LoRA merged
    # A point (Molmo2 points, Qwen point_2d) carries no extent: it becomes a square of this side, normalized
    # to the image (0.1 = a tenth of its width by a tenth of its height), centred on the point, clipped to
    # the image. WBF then fuses the squares of nearby points; crop padding and min_side add the context.
    point_box_size: float = Field(0.1, gt=0.0, le=1.0)

    _resolution = field_validator("resolution", mode="before")(_check_resolution)


class FuseSpec(StageSpec):
    name: ClassVar[str] = "fuse"
    method: Literal["wbf"] = "wbf"
    iou_thr: float = Field(0.5, gt=0.0, le=1.0)  # boxes overlapping more than this are one region
    skip_box_thr: float = Field(0.0, ge=0.0, lt=1.0)
    conf_type: Annotated[str, _one_of(CONF_TYPES)] = "avg"  # WBF's own score; agreement ignores it
    min_agreement: float = Field(0.0, ge=0.0, le=1.0)  # fraction of rollouts that must agree on a region
    max_regions: int = Field(4, ge=1, le=64)


class CropSpec(StageSpec):
    name: ClassVar[str] = "crop"
    padding: float = Field(0.15, ge=0.0, le=2.0)  # fraction of the region's size added on each side
    min_side: int = Field(256, ge=0)  # pixels of the original image
    # and at least this fraction of the image's longest side: slack for localization error that scales
    # with the image (a 2% miss is 20 px of a 1024-px image but 80 px of a 4096-px one)
    min_fraction: float = Field(0.0, ge=0.0, le=1.0)
    resolution: Resolution = 512  # longest side each crop is resized to
    max_crops: int = Field(4, ge=0, le=64)

    def plan(self, boxes: Sequence[Box], width: int, height: int) -> list[PixelBox]:
        """This stage's crops of normalized boxes on a width x height image (engine/cropping.py's rule)."""
        return plan_crops(
            boxes,
            width,
            height,
            padding=self.padding,
            min_side=self.min_side,
            min_fraction=self.min_fraction,
            max_crops=self.max_crops,
        )

    _resolution = field_validator("resolution", mode="before")(_check_resolution)


class ReasonSpec(StageSpec):
    name: ClassVar[str] = "reason"
    resolution: Resolution = 512  # the global view; crops come from the crop stage
    max_new_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    variant: str = "base"

    _resolution = field_validator("resolution", mode="before")(_check_resolution)


STAGE_SPECS: dict[str, type[StageSpec]] = {
    cls.name: cls for cls in (PerceiveSpec, FuseSpec, CropSpec, ReasonSpec)
}


class PromptsSpec(_Strict):
    perceive: str | None = None  # overrides the family's localization prompt; must contain {question}
    reason: str | None = None  # overrides the family's answer prompt; must contain {question}

    def with_defaults(self, perceive: str, reason: str) -> dict[str, str]:
        """The prompts a pipeline runs: these overrides, else the family's (`perceive`, `reason`)."""
        return {"perceive": self.perceive or perceive, "reason": self.reason or reason}

    @field_validator("perceive", "reason")
    @classmethod
    def _has_question(cls, value: str | None) -> str | None:
        if value is not None and "{question}" not in value:
            raise ValueError("must contain the placeholder {question}")
        return value


class ExampleSpec(_Strict):
    image: str  # used by `run` when no --image is given; relative to the current directory
    question: str


class Spec(_Strict):
    name: str | None = None  # a label for reports (eval tables and plots); default: the spec's file name
    model: ModelSpec
    stages: tuple[StageSpec, ...]
    prompts: PromptsSpec = PromptsSpec()
    seed: int = 0  # sampling is seeded per stage and rollout: a run is reproducible on one runtime
    reuse_prefix: bool = True  # false: every rollout re-prefills the image (the naive baseline)
    example: ExampleSpec | None = None  # a default input, so `sparc-engine run SPEC` works as it is

    def stage(self, kind: type[StageSpec]) -> StageSpec | None:
        return next((s for s in self.stages if isinstance(s, kind)), None)


# --- parse -------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError([f"{path}: no such spec file"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError([f"{path}: cannot read ({error})"]) from None
    except yaml.YAMLError as error:
        raise SpecError([f"{path}: not valid YAML ({' '.join(str(error).split())})"]) from None
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: a spec is a mapping with keys model, stages, ..."])
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides (value parsed as YAML) to a raw spec; list items by index."""
    problems = []
    for override in overrides:
        key_path, sep, text = override.partition("=")
        if not sep or not key_path:
            problems.append(f"--set {override!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        keys = key_path.split(".")
        node: Any = raw
        for depth, key in enumerate(keys):
            where = ".".join(keys[: depth + 1])
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    problems.append(f"--set {key_path}: {where} is not an index of a list of {len(node)}")
                    break
                key = int(key)
            elif not isinstance(node, dict):
                problems.append(f"--set {key_path}: {'.'.join(keys[:depth])} is not a mapping")
                break
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    if problems:
        raise SpecError(problems)
    return raw


# --- validate ----------------------------------------------------------------------------------------


def _describe(error: dict, prefix: tuple) -> str:
    path = ".".join(str(p) for p in (*prefix, *error["loc"]))
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{path}: {message} (got {error['input']!r})"


def _allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def validate(raw: dict) -> Spec:
    problems: list[str] = []
    stages: list[StageSpec] = []
    raw_stages = raw.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        problems.append("stages: must be a non-empty list of stages (perceive, fuse, crop, reason)")
        raw_stages = []
    for index, item in enumerate(raw_stages):
        if not isinstance(item, dict) or len(item) != 1:
            got = f"keys {', '.join(map(str, item))}" if isinstance(item, dict) else repr(item)
            problems.append(f"stages.{index}: one stage per list item, e.g. '- reason: {{...}}' (got {got})")
            continue
        ((name, options),) = item.items()
        if name not in STAGE_SPECS:
            problems.append(f"stages.{index}: unknown stage {name!r} (allowed: {', '.join(STAGE_SPECS)})")
            continue
        try:
            stages.append(STAGE_SPECS[name].model_validate(options or {}))
        except ValidationError as error:
            for e in error.errors():
                hint = (
                    f"; allowed: {_allowed_keys(STAGE_SPECS[name])}" if e["type"] == "extra_forbidden" else ""
                )
                problems.append(_describe(e, ("stages", index, name)) + hint)
    problems += _order_problems(stages) if len(stages) == len(raw_stages) else []
    try:
        spec = Spec.model_validate({**raw, "stages": stages})
    except ValidationError as error:
        problems += [_describe(e, ()) for e in error.errors() if e["loc"][:1] != ("stages",)]
        spec = None
    if problems:
        raise SpecError(problems)
    return spec


def _order_problems(stages: list[StageSpec]) -> list[str]:
    """Stages run in order over one context: each consumes what an earlier one produced."""
    names = [s.name for s in stages]
    problems = []
    for name in STAGE_SPECS:
        if names.count(name) > 1:
            problems.append(f"stages: {name!r} appears {names.count(name)} times (at most once)")
    needs = {"fuse": "perceive", "crop": "fuse"}
    for index, name in enumerate(names):
        if name in needs and needs[name] not in names[:index]:
            problems.append(f"stages.{index}: {name!r} needs a {needs[name]!r} stage before it")
    if "reason" not in names or names[-1] != "reason":
        problems.append("stages: the last stage must be 'reason' (it produces the answer)")
    if "perceive" in names and "fuse" not in names:
        problems.append("stages: 'perceive' needs a 'fuse' stage after it (turns rollouts into regions)")
    return problems


def load_spec(path: str | Path, overrides: list[str] = ()) -> Spec:
    return validate(apply_overrides(read_yaml(path), list(overrides)))
