"""Scoring a spec's results against ground truth: answers, regions, visual tokens, crops and latency.

Pure functions over the rows of a dataset (`engine.batch.Row`) and the records a batch run wrote
(`Result.to_dict()` per id). Boxes are pixel xyxy of the original image on both sides.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.batch import Row
from engine.cropping import PixelBox

IOU_THR = 0.5  # a ground-truth box counts as found at this IoU with some predicted region

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# "Answer: B", "The correct answer is (B)", "Option B": the words before the letter itself
_ANSWER_PREFIX = re.compile(
    r"^(?:the\s+)?(?:correct\s+|final\s+)?(?:answer|option|choice)\b(?:\s+is)?\s*:?\s*", re.I
)
# a letter marked as one: "(B)", "[B]", alone on its line, or followed by . ) : ("B.", "B) red");
# a word that merely starts with a letter ("Blue", "A cat") is not one
_LETTER = re.compile(r"[(\[]([a-z])[)\]]|([a-z])(?:[.):\n]|$)", re.I)


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation removed, articles (a, an, the) dropped, whitespace collapsed."""
    text = "".join(c for c in text.lower() if not _is_punctuation(c))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def _without_prefix(prediction: str) -> str:
    return _ANSWER_PREFIX.sub("", prediction.strip())


def chosen_letter(prediction: str, letters: Sequence[str]) -> str | None:
    """The option letter a prediction names (upper case), or None when it names none of `letters`."""
    match = _LETTER.match(_without_prefix(prediction))
    letter = (match.group(1) or match.group(2)).upper() if match else None
    return letter if letter in {x.upper() for x in letters} else None


def is_correct(prediction: str, answer: str, options: Mapping[str, str] | None = None) -> bool:
    """Normalized exact match; with options (and `answer` one of their letters), naming the right letter
    or giving the right option's text."""
    letters = {str(letter).upper(): str(text) for letter, text in (options or {}).items()}
    if answer.upper() not in letters:
        return normalize_answer(prediction) == normalize_answer(answer)
    letter = chosen_letter(prediction, list(letters))
    if letter is not None:
        return letter == answer.upper()
    return normalize_answer(_without_prefix(prediction)) == normalize_answer(letters[answer.upper()])


def pixel_box(values: Sequence[float]) -> PixelBox:
    """[x1, y1, x2, y2] in pixels -> the pixels it covers (outward rounding, as the engine's regions)."""
    x1, y1, x2, y2 = values
    return PixelBox(math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2))


def _best_ious(pred_boxes: Sequence[PixelBox], gt_boxes: Sequence[PixelBox]) -> list[float]:
    if not gt_boxes:
        raise ValueError("no ground-truth boxes: recall and IoU are undefined")
    return [max((gt.iou(pred) for pred in pred_boxes), default=0.0) for gt in gt_boxes]


def region_recall(
    pred_boxes: Sequence[PixelBox], gt_boxes: Sequence[PixelBox], iou_thr: float = IOU_THR
) -> float:
    """Fraction of the (non-empty) ground-truth boxes that some predicted region overlaps at IoU >= iou_thr."""
    return float(np.mean([iou >= iou_thr for iou in _best_ious(pred_boxes, gt_boxes)]))


def crop_recall(crops: Sequence[PixelBox], gt_boxes: Sequence[PixelBox]) -> float:
    """Fraction of the (non-empty) ground-truth boxes wholly inside some crop: what the reason stage can see
    at the crops' resolution. Recall at an IoU threshold misses this when regions are coarser than the
    objects (a region a few times an object's size can hold it and still overlap it at IoU < 0.5)."""
    if not gt_boxes:
        raise ValueError("no ground-truth boxes: recall is undefined")
    return float(np.mean([any(crop.contains(gt) for crop in crops) for gt in gt_boxes]))


def mean_best_iou(pred_boxes: Sequence[PixelBox], gt_boxes: Sequence[PixelBox]) -> float:
    """Mean over the (non-empty) ground-truth boxes of the best IoU with any predicted region (0 if none)."""
    return float(np.mean(_best_ious(pred_boxes, gt_boxes)))


@dataclass(frozen=True)
class Group:
    accuracy: float  # 0..1
    n: int  # answered rows with this value


@dataclass(frozen=True)
class SpecScore:
    """One spec on one dataset; every mean is over the answered rows (None when there are none)."""

    name: str
    answered: int
    failed: int  # rows without a result (the batch run reported why; a rerun retries them)
    accuracy: float | None  # 0..1
    by: dict[str, dict[str, Group]]  # row field -> its value (as text) -> accuracy on those rows
    boxes_n: int  # answered rows with ground-truth boxes: what recall and IoU are over
    region_recall: float | None  # at IoU >= IOU_THR
    mean_iou: float | None
    crop_recall: float | None  # ground-truth boxes wholly inside a crop
    visual_tokens_computed: float | None  # image tokens run through the model, all stages
    visual_tokens_in_context: float | None  # image tokens the reason stage sees (view + crops)
    crops: float | None
    p50_ms: float | None  # latency: the sum of the stages' wall times
    p95_ms: float | None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _sort_key(value: object) -> tuple:
    """Numbers in numeric order (512 before 1024), then text."""
    return (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))


def score_spec(
    name: str, rows: Sequence[Row], results: Mapping[str, dict], by: Sequence[str] = ()
) -> SpecScore:
    """Score `results` (id -> result record) on `rows`; a row without a record counts as failed."""
    answered = [(row, results[row.id]) for row in rows if row.id in results]
    correct = {
        row.id: is_correct(result["answer"], str(row.extra["answer"]), row.extra.get("options"))
        for row, result in answered
    }
    groups: dict[str, dict[str, Group]] = {}
    for field in by:
        values = {str(row.extra[field]): row.extra[field] for row, _ in answered if field in row.extra}
        for text in sorted(values, key=lambda t: _sort_key(values[t])):
            hits = [
                correct[row.id] for row, _ in answered if field in row.extra and str(row.extra[field]) == text
            ]
            groups.setdefault(field, {})[text] = Group(sum(hits) / len(hits), len(hits))

    recalls, ious, held = [], [], []
    for row, result in answered:
        gt = [pixel_box(box) for box in row.extra.get("boxes") or []]
        if gt:
            pred = [pixel_box(region["box"]) for region in result["regions"]]
            recalls.append(region_recall(pred, gt))
            ious.append(mean_best_iou(pred, gt))
            held.append(crop_recall([pixel_box(box) for box in result["crops"]], gt))
    records = [result for _, result in answered]
    latencies = [sum(stage["ms"] for stage in r["stages"]) for r in records]
    return SpecScore(
        name=name,
        answered=len(answered),
        failed=len(rows) - len(answered),
        accuracy=_mean(list(correct.values())),
        by=groups,
        boxes_n=len(recalls),
        region_recall=_mean(recalls),
        mean_iou=_mean(ious),
        crop_recall=_mean(held),
        visual_tokens_computed=_mean(
            [sum(s["visual_tokens_computed"] for s in r["stages"]) for r in records]
        ),
        # the last stage is always the reason stage (the spec validator's rule)
        visual_tokens_in_context=_mean([r["stages"][-1]["visual_tokens"] for r in records]),
        crops=_mean([len(r["crops"]) for r in records]),
        p50_ms=_percentile(latencies, 50),
        p95_ms=_percentile(latencies, 95),
    )
