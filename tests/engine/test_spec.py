from pathlib import Path

import pytest
import yaml

from engine.errors import SpecError
from engine.spec import CropSpec, FuseSpec, PerceiveSpec, ReasonSpec, apply_overrides, load_spec, validate

SPECS = sorted((Path(__file__).parents[2] / "specs").glob("*.yaml"))


def good() -> dict:
    return {
        "model": {"bundle": "models/x", "runtime": "torch_ref"},
        "stages": [
            {"perceive": {"resolution": 512, "rollouts": 8}},
            {"fuse": {"iou_thr": 0.5}},
            {"crop": {"min_side": 256}},
            {"reason": {"resolution": "full"}},
        ],
    }


def problems(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as caught:
        validate(raw)
    return caught.value.problems


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    spec = load_spec(path)
    assert isinstance(spec.stages[-1], ReasonSpec)
    assert path.read_text().startswith("#"), "every shipped spec begins with the command that runs it"


def test_good_spec_becomes_typed_objects():
    spec = validate(good())
    assert [type(s) for s in spec.stages] == [PerceiveSpec, FuseSpec, CropSpec, ReasonSpec]
    assert spec.stages[0].rollouts == 8 and spec.stages[0].temperature == 0.7
    assert spec.stages[3].resolution == "full"
    assert spec.reuse_prefix is True and spec.model.device == "auto"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "stages.0.perceive.rollouts",
            0,
            "stages.0.perceive.rollouts: Input should be greater than or equal to 1",
        ),
        ("stages.0.perceive.resolution", 16, "stages.0.perceive.resolution: must be an integer >= 32"),
        ("stages.0.perceive.resolution", "high", "stages.0.perceive.resolution: must be an integer >= 32"),
        ("stages.1.fuse.iou_thr", 1.5, "stages.1.fuse.iou_thr: Input should be less than or equal to 1"),
        ("stages.1.fuse.conf_type", "median", "stages.1.fuse.conf_type: must be one of: avg"),
        ("stages.2.crop.padding", -1, "stages.2.crop.padding"),
        ("model.runtime", "tflite", "model.runtime: must be one of: "),
        ("model.device", "tpu", "model.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ],
)
def test_bad_value_names_key_path_value_and_allowed(path, value, expected):
    raw = apply_overrides(good(), [f"{path}={yaml.safe_dump(value).strip().removesuffix('...').strip()}"])
    found = problems(raw)
    assert any(p.startswith(expected) for p in found), found
    assert any(repr(value) in p for p in found), found


def test_unknown_keys_and_stages_are_refused_with_allowed_names():
    raw = good()
    raw["stages"][0]["perceive"]["rollout"] = 4
    raw["stages"].insert(1, {"dream": {}})
    raw["modle"] = {}
    found = problems(raw)
    assert any(
        p.startswith("stages.0.perceive.rollout: unknown key; allowed: resolution, rollouts") for p in found
    )
    assert any(
        p.startswith("stages.1: unknown stage 'dream' (allowed: perceive, fuse, crop, reason)") for p in found
    )
    assert "modle: unknown key" in found


def test_all_problems_reported_at_once():
    raw = good()
    raw["stages"][0]["perceive"]["rollouts"] = -1
    raw["stages"][1]["fuse"]["max_regions"] = 0
    raw["model"]["runtime"] = "nope"
    assert len(problems(raw)) == 3


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        ([{"fuse": {}}, {"reason": {}}], "stages.0: 'fuse' needs a 'perceive' stage before it"),
        ([{"perceive": {}}, {"crop": {}}, {"reason": {}}], "stages.1: 'crop' needs a 'fuse' stage before it"),
        ([{"perceive": {}}, {"fuse": {}}], "stages: the last stage must be 'reason'"),
        ([{"reason": {}}, {"reason": {}}], "stages: 'reason' appears 2 times"),
        ([], "stages: must be a non-empty list"),
        (
            [{"perceive": {}, "fuse": {}}],
            "stages.0: one stage per list item, e.g. '- reason: {...}' (got keys perceive, fuse)",
        ),
        (["reason"], "stages.0: one stage per list item, e.g. '- reason: {...}' (got 'reason')"),
    ],
)
def test_stage_order_is_checked(stages, expected):
    raw = good()
    raw["stages"] = stages
    assert any(p.startswith(expected) for p in problems(raw))


def test_baseline_is_a_single_reason_stage():
    spec = validate({"model": {"bundle": "m"}, "stages": [{"reason": None}]})
    assert len(spec.stages) == 1 and spec.stages[0].max_new_tokens == 256


def test_prompt_overrides_need_the_question_placeholder():
    raw = good()
    raw["prompts"] = {"perceive": "find things"}
    assert any(
        p.startswith("prompts.perceive: must contain the placeholder {question}") for p in problems(raw)
    )


def test_perception_lora_only_for_torch_ref():
    raw = good()
    raw["model"].update(perception_lora="lora/", runtime="torch_ref")
    assert validate(raw).model.perception_lora == "lora/"


def test_overrides_parse_values_as_yaml_and_index_lists():
    raw = apply_overrides(good(), ["stages.0.perceive.rollouts=4", "reuse_prefix=false", "model.device=cpu"])
    spec = validate(raw)
    assert spec.stages[0].rollouts == 4 and spec.reuse_prefix is False and spec.model.device == "cpu"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stages.9.perceive.rollouts=4", "stages.9 is not an index of a list of 4"),
        ("stages.x=1", "stages.x is not an index"),
        ("rollouts", "expected key.path=value"),
        ("model.bundle.x=1", "model.bundle is not a mapping"),
    ],
)
def test_bad_overrides(override, expected):
    with pytest.raises(SpecError) as caught:
        apply_overrides(good(), [override])
    assert expected in caught.value.problems[0]


def test_unreadable_spec_files(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="a spec is a mapping"):
        load_spec(tmp_path / "list.yaml")
