import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.boxes import Box
from engine.families.qwen3vl.parser import parse_qwen_grounding
from tests.support import assert_valid_grounding

CAT_DOG = json.dumps(
    [{"bbox_2d": [100, 200, 300, 400], "label": "cat"}, {"bbox_2d": [500, 0, 1000, 250], "label": "dog"}]
)
CAT_DOG_BOXES = (Box(0.1, 0.2, 0.3, 0.4, "cat"), Box(0.5, 0.0, 1.0, 0.25, "dog"))


# --- well-formed output is recovered exactly --------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"```json\n{CAT_DOG}\n```",
        f"```\n{CAT_DOG}\n```",
        CAT_DOG,
        f"  {CAT_DOG}\n",
        f"Here are the objects:\n```json\n{CAT_DOG}\n```\nLet me know if you need more.",
        f"The cat and the dog are at {CAT_DOG}, as requested.",
    ],
)
def test_well_formed_boxes_are_recovered_exactly(text):
    result = parse_qwen_grounding(text)
    assert result.boxes == CAT_DOG_BOXES
    assert_valid_grounding(result)


def test_clean_json_has_no_notes():
    assert parse_qwen_grounding(f"```json\n{CAT_DOG}\n```").notes == ()


def test_single_object_instead_of_list():
    result = parse_qwen_grounding('```json\n{"bbox_2d": [100, 200, 300, 400], "label": "cat"}\n```')
    assert result.boxes == (Box(0.1, 0.2, 0.3, 0.4, "cat"),)


def test_objects_one_per_line_without_list():
    text = '{"bbox_2d": [100, 200, 300, 400], "label": "a"}\n{"bbox_2d": [0, 0, 10, 10], "label": "b"}'
    assert parse_qwen_grounding(text).boxes == (Box(0.1, 0.2, 0.3, 0.4, "a"), Box(0.0, 0.0, 0.01, 0.01, "b"))


def test_wrapped_list_is_found():
    text = json.dumps({"objects": [{"bbox_2d": [100, 200, 300, 400], "label": "cat"}]})
    assert parse_qwen_grounding(text).boxes == (Box(0.1, 0.2, 0.3, 0.4, "cat"),)


def test_point_becomes_square_of_configurable_size():
    text = '[{"point_2d": [500, 250], "label": "cup"}]'
    (box,) = parse_qwen_grounding(text).boxes
    assert box.as_list() == pytest.approx([0.45, 0.2, 0.55, 0.3])
    assert box.label == "cup"
    (small,) = parse_qwen_grounding(text, point_box_size=0.02).boxes
    assert small.as_list() == pytest.approx([0.49, 0.24, 0.51, 0.26])


def test_point_near_edge_is_clipped_and_point_outside_is_clipped_to_edge():
    corner, outside = parse_qwen_grounding('[{"point_2d": [0, 1000]}, {"point_2d": [1200, 500]}]').boxes
    assert corner.as_list() == pytest.approx([0.0, 0.95, 0.05, 1.0])
    assert outside.as_list() == pytest.approx([0.95, 0.45, 1.0, 0.55])


def test_invalid_point_box_size_is_a_programming_error():
    with pytest.raises(ValueError):
        parse_qwen_grounding("[]", point_box_size=0.0)


def test_labels():
    text = '[{"bbox_2d": [0, 0, 10, 10], "label": 7}, {"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": [0, 0, 10, 10], "label": null}]'
    assert [b.label for b in parse_qwen_grounding(text).boxes] == ["7", "", ""]


# --- repairs, skips and their notes -----------------------------------------------------------------------


def test_out_of_range_is_clipped_with_note():
    result = parse_qwen_grounding('[{"bbox_2d": [-50, 200, 1200, 400], "label": "x"}]')
    assert result.boxes == (Box(0.0, 0.2, 1.0, 0.4, "x"),)
    assert any("clipped" in note for note in result.notes)


def test_swapped_corners_are_ordered_with_note():
    result = parse_qwen_grounding('[{"bbox_2d": [300, 400, 100, 200]}]')
    assert result.boxes == (Box(0.1, 0.2, 0.3, 0.4),)
    assert any("swapped" in note for note in result.notes)


@pytest.mark.parametrize(
    "bbox",
    [
        "[100, 100, 100, 400]",  # zero width
        "[1100, 100, 1200, 400]",  # zero width after clipping
        '["100", 200, 300, 400]',
        "[true, 200, 300, 400]",
        "[100, 200, 300]",
        "[[100, 200, 300, 400]]",
        "[NaN, 200, 300, 400]",
        "[Infinity, 200, 300, 400]",
        "[1" + "0" * 400 + ", 200, 300, 400]",  # too large for a float
        "null",
        '"100,200,300,400"',
    ],
)
def test_bad_entries_are_skipped_with_note_and_others_kept(bbox):
    text = f'[{{"bbox_2d": {bbox}, "label": "bad"}}, {{"bbox_2d": [100, 200, 300, 400], "label": "good"}}]'
    result = parse_qwen_grounding(text)
    assert result.boxes == (Box(0.1, 0.2, 0.3, 0.4, "good"),)
    assert any("entry 0" in note and "skipped" in note for note in result.notes)


def test_truncated_list_recovers_complete_objects_with_note():
    text = '```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "cat"}, {"bbox_2d": [500, 0, 10'
    result = parse_qwen_grounding(text)
    assert result.boxes == (Box(0.1, 0.2, 0.3, 0.4, "cat"),)
    assert any("recovered 1" in note for note in result.notes)


def test_brackets_inside_labels_do_not_create_boxes():
    label = 'see {"bbox_2d": [0, 0, 500, 500]} and [1, 2]'
    text = json.dumps([{"bbox_2d": [100, 200, 300, 400], "label": label}])
    assert parse_qwen_grounding(text).boxes == (Box(0.1, 0.2, 0.3, 0.4, label),)
    # Cut inside the label: the phantom box in the string must not appear.
    assert parse_qwen_grounding(text[: text.index("500")]).boxes == ()


@pytest.mark.parametrize(
    "text", ["", "   ", "I cannot see any cat.", "[]", "{}", "```json\n```", "```json\n[]\n```", "null", "42"]
)
def test_no_boxes(text):
    result = parse_qwen_grounding(text)
    assert result.boxes == ()
    assert result.notes  # says why


def test_non_text_input_does_not_raise():
    assert parse_qwen_grounding(None).boxes == ()  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["[" * 5000, '{"a": ' * 3000, "[1, " * 3000, "{" * 5000 + CAT_DOG])
def test_degenerate_nesting_does_not_raise(text):
    result = parse_qwen_grounding(text)
    assert_valid_grounding(result)


def test_boxes_after_degenerate_nesting_are_found():
    assert parse_qwen_grounding("[" * 5000 + " " + CAT_DOG).boxes == CAT_DOG_BOXES


# --- fuzzing -----------------------------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(-2000, 3000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**400), 10**400),
)
json_scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=10))
coordinate_lists = st.lists(st.one_of(numbers, json_scalars), min_size=0, max_size=5)
grounding_objects = st.fixed_dictionaries(
    {}, optional={"bbox_2d": coordinate_lists, "point_2d": coordinate_lists, "label": json_scalars}
)
json_values = st.recursive(
    st.one_of(json_scalars, grounding_objects),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_arbitrary_text_never_raises(text):
    assert_valid_grounding(parse_qwen_grounding(text))


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(["{}", "```json\n{}\n```", "Answer: {} done", "```json\n{}"]))
def test_fuzz_jsonish_structures_never_raise(value, template):
    text = template.replace("{}", json.dumps(value))
    assert_valid_grounding(parse_qwen_grounding(text))
    assert_valid_grounding(parse_qwen_grounding(text[: len(text) // 2]))


coordinate = st.integers(0, 1000)
labels = st.text(max_size=12)


@st.composite
def qwen_entries(draw):
    """A well-formed grounding object and the box it must parse to."""
    label = draw(labels)
    if draw(st.booleans()):
        x1, x2 = sorted(draw(st.lists(coordinate, min_size=2, max_size=2, unique=True)))
        y1, y2 = sorted(draw(st.lists(coordinate, min_size=2, max_size=2, unique=True)))
        box = Box(x1 / 1000, y1 / 1000, x2 / 1000, y2 / 1000, label)
        return {"bbox_2d": [x1, y1, x2, y2], "label": label}, box
    x, y = draw(coordinate), draw(coordinate)
    cx, cy = x / 1000, y / 1000
    box = Box.from_corners(cx - 0.05, cy - 0.05, cx + 0.05, cy + 0.05, label)  # default point_box_size 0.1
    return {"point_2d": [x, y], "label": label}, box


prose = st.text(alphabet="abcdefghij .,:!?\n", max_size=30)  # no brackets or quotes, so no JSON of its own


@settings(max_examples=300, deadline=None)
@given(st.lists(qwen_entries(), max_size=6), prose, prose, st.booleans(), st.data())
def test_fuzz_truncation_recovers_exactly_the_objects_complete_before_cut(
    entries, before, after, fenced, data
):
    # Render by hand so that we know where each object ends.
    open_fence, close_fence = ("```json\n", "\n```") if fenced else ("", "")
    text, ends = before + open_fence + "[", []
    for i, (obj, _) in enumerate(entries):
        text += (", " if i else "") + json.dumps(obj)
        ends.append(len(text))
    text += "]" + close_fence + after
    truth = tuple(box for _, box in entries)

    assert parse_qwen_grounding(text).boxes == truth
    cut = data.draw(st.integers(0, len(text)), label="cut")
    result = parse_qwen_grounding(text[:cut])
    assert_valid_grounding(result)
    complete = sum(end <= cut for end in ends)
    assert result.boxes == truth[:complete]
