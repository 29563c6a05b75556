"""parse_molmo_points: Molmo2 `<points coords=...>` and Molmo v1 `<point x= y=>` output -> normalized boxes."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.boxes import Box
from engine.families.molmo2.parser import parse_molmo_points
from engine.grounding import Grounding
from tests.support import assert_valid_grounding


def centres(result: Grounding) -> list[tuple[float, float]]:
    return [tuple(round(c, 6) for c in box.center) for box in result.boxes]


def test_molmo2_points_are_0_to_1000_of_the_image():
    text = 'Counting the <points coords="1 1 073 160 2 173 600 3 258 725" alt="boats">the boats</points> gives 3.'
    result = parse_molmo_points(text)
    assert centres(result) == [(0.073, 0.16), (0.173, 0.6), (0.258, 0.725)]
    assert {box.label for box in result.boxes} == {"the boats"}
    assert result.notes == ()


def test_point_becomes_a_square_of_point_box_size():
    (box,) = parse_molmo_points('<points coords="1 1 500 500">cat</points>', point_box_size=0.2).boxes
    assert box == Box(0.4, 0.4, 0.6, 0.6, "cat")


def test_square_is_clipped_at_the_image_border():
    (box,) = parse_molmo_points('<points coords="1 1 000 1000"/>').boxes
    assert box == Box(0.0, 0.95, 0.05, 1.0, "")


def test_only_points_on_the_wanted_image_are_kept():
    text = '<points coords="1 1 452 321;2 1 485 350;1 2 100 100">red car</points>'
    result = parse_molmo_points(text)
    assert centres(result) == [(0.452, 0.321), (0.1, 0.1)]
    assert any("image 2 skipped" in note for note in result.notes)
    assert centres(parse_molmo_points(text, image_index=2)) == [(0.485, 0.35)]


def test_several_tags_and_tracks():
    text = '<points coords="1 1 100 200">a</points> and <tracks coords="1 1 300 400">b</tracks>'
    result = parse_molmo_points(text)
    assert [b.label for b in result.boxes] == ["a", "b"]


def test_self_closing_tag_takes_the_alt_label_not_the_following_prose():
    result = parse_molmo_points('<points coords="1 1 100 200" alt="mug"/> is on the table')
    assert [b.label for b in result.boxes] == ["mug"]


def test_molmo1_single_point_is_percent():
    result = parse_molmo_points('<point x="61.5" y="40.6" alt="cat">cat</point>')
    assert centres(result) == [(0.615, 0.406)]


def test_molmo1_multi_point_is_percent():
    text = '<points x1="9.1" y1="11.7" x2="17.2" y2="41.3" alt="the boats">the boats</points>'
    assert centres(parse_molmo_points(text)) == [(0.091, 0.117), (0.172, 0.413)]


def test_truncated_output_keeps_complete_points():
    result = parse_molmo_points('<points coords="1 1 100 200 2 300 4')
    assert centres(result) == [(0.1, 0.2)]
    assert any("cut off" in note for note in result.notes)
    assert any("incomplete point" in note for note in result.notes)


def test_out_of_range_point_is_clipped_to_the_edge():
    result = parse_molmo_points('<points coords="1 1 1200 500">x</points>')
    assert centres(result) == [(0.975, 0.5)]
    assert any("outside 0-1000 clipped" in note for note in result.notes)


@pytest.mark.parametrize(
    "text",
    ["There are none.", "", "<points>", '<points coords="">x</points>', '<point x="a" y="1">', "<<<>>>"],
)
def test_nothing_to_recover_gives_no_boxes_and_a_note(text):
    result = parse_molmo_points(text)
    assert result.boxes == ()
    assert result.notes
    assert_valid_grounding(result)


def test_non_text_input_gives_a_note():
    assert parse_molmo_points(None).notes  # type: ignore[arg-type]


def test_bad_point_box_size_is_a_programming_error():
    with pytest.raises(ValueError):
        parse_molmo_points("", point_box_size=0.0)


# --- fuzzing: never raises, every box valid ------------------------------------------------------------

numbers = st.one_of(
    st.integers(-50, 1500).map(lambda v: f"{v:03d}"),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "x", "1e400", "-0", "nan", "1_000"]),
)


@st.composite
def molmo_outputs(draw) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["points", "point", "tracks", "POINTS"]))
        values = draw(st.lists(numbers, max_size=10))
        separator = draw(st.sampled_from([" ", ";", "\t", " ; ", ","]))
        coords = separator.join(values)
        style = draw(st.sampled_from(["coords", "xy", "xyn"]))
        if style == "coords":
            attrs = f'coords="{coords}"'
        elif style == "xy":
            attrs = f'x="{draw(numbers)}" y="{draw(numbers)}"'
        else:
            attrs = " ".join(f'x{i}="{draw(numbers)}" y{i}="{draw(numbers)}"' for i in range(1, 4))
        label = draw(st.text(max_size=12))
        closing = draw(st.sampled_from([f">{label}</{kind}>", "/>", ">", ""]))
        parts.append(f"{draw(st.text(max_size=10))}<{kind} {attrs}{closing}")
    text = "".join(parts)
    cut = draw(st.integers(0, len(text)))
    return text[:cut] if draw(st.booleans()) else text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_never_raises_on_arbitrary_text(text):
    assert_valid_grounding(parse_molmo_points(text))


@settings(max_examples=400, deadline=None)
@given(molmo_outputs(), st.floats(0.01, 1.0))
def test_never_raises_on_mangled_points(text, size):
    result = parse_molmo_points(text, point_box_size=size)
    assert_valid_grounding(result)
    for box in result.boxes:  # a square of `size`, unless clipped by the image border
        assert box.width <= size + 1e-9 and box.height <= size + 1e-9
