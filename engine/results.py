"""What a query produces: the answer, the regions on the original image, and a per-stage trace."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.cropping import PixelBox


@dataclass
class StageTrace:
    name: str
    prompt_tokens: int = 0  # prompt tokens run through the model in this stage
    reused_tokens: int = (
        0  # prompt tokens served from KV computed once (earlier stage, or forked to rollouts)
    )
    generated_tokens: int = 0
    visual_tokens: int = 0  # image placeholder tokens in this stage's prompt (global view + crops)
    # image tokens this stage actually ran through the model: 0 for a view served from the prefix cache,
    # once per rollout on the naive path (reuse_prefix: false)
    visual_tokens_computed: int = 0
    ms: float = 0.0
    notes: list[str] = field(default_factory=list)  # parser recoveries, empty fusions, ...
    outputs: list[str] = field(default_factory=list)  # raw model texts (rollouts, answer)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "generated_tokens": self.generated_tokens,
            "visual_tokens": self.visual_tokens,
            "visual_tokens_computed": self.visual_tokens_computed,
            "ms": round(self.ms, 3),
        }


@dataclass
class RegionResult:
    box: PixelBox  # pixels of the original image
    score: float  # fraction of rollouts that agree on it


@dataclass
class Result:
    answer: str
    regions: list[RegionResult]
    crops: list[PixelBox]
    stages: list[StageTrace]

    def to_dict(self) -> dict:
        """The `--json` contract: answer, regions (pixel xyxy + score), crops (pixel xyxy), stages."""
        return {
            "answer": self.answer,
            "regions": [{"box": r.box.as_list(), "score": round(r.score, 6)} for r in self.regions],
            "crops": [c.as_list() for c in self.crops],
            "stages": [s.to_dict() for s in self.stages],
        }
