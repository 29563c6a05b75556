"""Scoring on hand-made rows: answer matching (open and multiple choice), region recall and IoU, aggregates."""

from pathlib import Path

import pytest

from engine.batch import Row
from engine.cropping import PixelBox
from evals.scoring import (
    chosen_letter,
    crop_recall,
    is_correct,
    mean_best_iou,
    normalize_answer,
    pixel_box,
    region_recall,
    score_spec,
)

OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "a yellow star"}


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Red.", "red"),
        ("  a   big, blue  CAR!! ", "big blue car"),
        ("an apple", "apple"),
        ("theater", "theater"),  # articles are words, not prefixes
        ("«Star»", "star"),  # unicode punctuation too
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_open_answers_match_after_normalization():
    assert is_correct("The circle.", "circle")
    assert is_correct("CIRCLE", "circle")
    assert not is_correct("a red circle", "circle")
    assert not is_correct("", "circle")


@pytest.mark.parametrize(
    "prediction",
    ["B", "b", "(B)", "[B]", "B.", "B) green", "B. green", "B: green", "Answer: B", "The answer is (B).",
     "Option B", "B\nbecause it is green", "green", "Green.", "Answer: green"],
)  # fmt: skip
def test_multiple_choice_right_letter_or_text(prediction):
    assert is_correct(prediction, "B", OPTIONS)


@pytest.mark.parametrize(
    "prediction",
    [
        "Blue",  # a word starting with B is not the letter B (and blue is C)
        "Black",
        "A",
        "(C)",
        "Answer: D",
        "E",  # not an option: read as text, which matches nothing
        "B green",  # a bare letter followed by words is not marked as a letter
    ],
)
def test_multiple_choice_wrong(prediction):
    assert not is_correct(prediction, "B", OPTIONS)


def test_words_starting_with_option_letters_are_read_as_text():
    assert chosen_letter("Blue", "ABCD") is None
    assert chosen_letter("A yellow star", "ABCD") is None  # the article, not option A
    assert is_correct("A yellow star", "D", OPTIONS)
    assert is_correct("blue", "C", OPTIONS)
    assert chosen_letter("D.", "ABC") is None  # D is not one of this row's letters


def test_options_without_a_letter_answer_fall_back_to_exact_match():
    assert is_correct("green", "green", OPTIONS)  # the answer given as text, not a letter


def test_region_recall_at_a_threshold():
    gt = [PixelBox(0, 0, 10, 10)]
    half = [PixelBox(0, 0, 10, 5)]  # IoU 0.5
    assert region_recall(half, gt) == 1.0
    assert region_recall(half, gt, iou_thr=0.6) == 0.0
    two = [PixelBox(0, 0, 10, 10), PixelBox(50, 50, 60, 60)]
    assert region_recall(half, two) == 0.5  # one of two found
    assert region_recall([], two) == 0.0


def test_crop_recall_counts_boxes_wholly_inside_a_crop():
    gt = [PixelBox(10, 10, 20, 20), PixelBox(50, 50, 60, 60)]
    coarse = [PixelBox(0, 0, 40, 40)]  # holds the first box at IoU 1/16: no region recall, still in a crop
    assert crop_recall(coarse, gt) == 0.5
    assert region_recall(coarse, gt) == 0.0
    assert crop_recall([PixelBox(0, 0, 40, 40), PixelBox(45, 45, 60, 60)], gt) == 1.0
    assert crop_recall([PixelBox(12, 12, 40, 40)], gt) == 0.0  # cut through is not inside
    assert crop_recall([], gt) == 0.0
    with pytest.raises(ValueError):
        crop_recall(coarse, [])


def test_mean_best_iou():
    gt = [PixelBox(0, 0, 10, 10), PixelBox(50, 50, 60, 60)]
    pred = [PixelBox(0, 0, 10, 5), PixelBox(0, 0, 10, 10), PixelBox(100, 100, 110, 110)]
    assert mean_best_iou(pred, gt) == pytest.approx((1.0 + 0.0) / 2)  # the best per GT box, 0 if none
    assert mean_best_iou([], gt) == 0.0
    with pytest.raises(ValueError):
        mean_best_iou(pred, [])


def test_pixel_box_rounds_outward():
    assert pixel_box([1.2, 2.7, 10.1, 20.0]) == PixelBox(1, 2, 11, 20)


def _row(row_id, answer, **extra):
    return Row(row_id, Path(f"{row_id}.png"), "q", {"answer": answer, **extra})


def _record(answer, regions=(), crops=0, stages=((64, 64, 10.0),)):
    """stages: (visual_tokens, visual_tokens_computed, ms) per stage; the last one is the reason stage."""
    return {
        "answer": answer,
        "regions": [{"box": box, "score": 1.0} for box in regions],
        "crops": [[0, 0, 10, 10]] * crops,
        "stages": [{"visual_tokens": v, "visual_tokens_computed": c, "ms": ms} for v, c, ms in stages],
    }


def test_score_spec_aggregates_over_answered_rows():
    rows = [
        _row("a", "circle", category="shape", long_side=1024, boxes=[[0, 0, 10, 10]]),
        _row("b", "B", options=OPTIONS, category="color", long_side=512, boxes=[[0, 0, 10, 10], [50, 50, 60, 60]]),
        _row("c", "square", category="shape", long_side=1024),  # no boxes: not in recall/IoU
        _row("d", "star", category="shape", long_side=512),  # no result: failed
    ]  # fmt: skip
    sparc = ((64, 64, 30.0), (0, 0, 0.0), (16, 0, 0.0), (80, 16, 10.0))  # perceive, fuse, crop, reason
    results = {
        "a": _record("Circle.", regions=[[0, 0, 10, 5]], crops=1, stages=sparc),
        "b": _record("(C)", regions=[[0, 0, 10, 10]], crops=2, stages=sparc),
        "c": _record("square", stages=((64, 0, 20.0),)),
    }
    score = score_spec("sparc", rows, results, by=["category", "long_side", "missing_field"])
    assert (score.answered, score.failed) == (3, 1)
    assert score.accuracy == pytest.approx(2 / 3)
    assert list(score.by) == ["category", "long_side"]  # fields no row has are skipped
    assert list(score.by["long_side"]) == ["512", "1024"]  # numeric order
    assert score.by["category"]["shape"].accuracy == 1.0 and score.by["category"]["shape"].n == 2
    assert score.by["category"]["color"].accuracy == 0.0
    assert score.boxes_n == 2
    assert score.region_recall == pytest.approx((1.0 + 0.5) / 2)
    assert score.mean_iou == pytest.approx((0.5 + (1.0 + 0.0) / 2) / 2)
    assert score.crop_recall == pytest.approx((1.0 + 0.5) / 2)  # b's second box is in no crop
    assert score.visual_tokens_computed == pytest.approx((80 + 80 + 0) / 3)
    assert score.visual_tokens_in_context == pytest.approx((80 + 80 + 64) / 3)
    assert score.crops == pytest.approx(1.0)
    assert score.p50_ms == pytest.approx(40.0)
    assert 20.0 < score.p95_ms <= 40.0


def test_score_spec_with_nothing_answered():
    score = score_spec("none", [_row("a", "x")], {}, by=["category"])
    assert (score.answered, score.failed, score.accuracy, score.by) == (0, 1, None, {})
    assert score.region_recall is None and score.p95_ms is None
