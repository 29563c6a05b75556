"""Weighted Boxes Fusion over the N rollouts of the perceive stage.

Each rollout is one sampled answer of the model: a list of boxes (normalized). WBF clusters boxes across
rollouts class-agnostically and averages each cluster into one fused box. Every box enters with score 1.0
and every rollout with weight 1, so a fused box is the plain mean of its cluster.

`weighted_boxes_fusion` is our own WBF, equal to ensemble_boxes 1.0.9's (boxes, scores and labels; the
tests fuzz both against each other): the device install then needs no numba, llvmlite or pandas, which
ensemble-boxes pulls in for its other algorithms. Equal means the same arithmetic, not only the same idea:
boxes join clusters in the order of a sort whose ties numpy breaks, and a box sits at the IoU threshold or
not depending on float32 rounding of the running mean, so both follow ensemble_boxes step for step.

Agreement rule (Region.score): WBF's own confidence can exceed the fraction of rollouts that agree, e.g.
when one rollout has two boxes in a cluster, so we recompute it. Every input box votes for the fused box it
overlaps most (highest IoU); a region's score is the number of DISTINCT rollouts with a vote for it divided
by the number of rollouts N, which counts rollouts that returned no boxes. Each box votes once, so a score is
in [1/N, 1] and never double-counts. A fused box that gets no vote (all its boxes sit closer to a neighbouring
fused box, a rare artefact of WBF's running average) is a near-duplicate of that neighbour and is dropped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from engine.boxes import Box, boxes_to_array, iou_matrix, pairwise_iou

# How WBF scores a fused box (ensemble_boxes' names). With unit scores and weights they only change WBF's
# own confidence, which Region.score replaces.
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


# WBF averages in float32: a side thinner than this (far below a pixel of any image) collapses to zero there.
MIN_SIDE = 1e-6

# columns of the rows WBF works on: score x model weight, model weight, model index, x1, y1, x2, y2
SCORE, WEIGHT, MODEL, COORDS = 0, 1, 2, slice(3, 7)


def fusable(box: Box) -> bool:
    return box.width > MIN_SIDE and box.height > MIN_SIDE


class Fused(NamedTuple):
    boxes: np.ndarray  # (M, 4) float64, normalized [x1, y1, x2, y2]
    scores: np.ndarray  # (M,) WBF confidence, highest first
    labels: np.ndarray  # (M,) float64 class ids


def weighted_boxes_fusion(
    boxes_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    labels_list: Sequence[np.ndarray],
    *,
    weights: Sequence[float] | None = None,
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.0,
    conf_type: str = "avg",
) -> Fused:
    """Fuse the boxes of several models (here: rollouts), label by label.

    boxes_list[m]: (n_m, 4) normalized corners of model m; swapped corners are ordered, coordinates clipped
    to [0, 1], and boxes of zero area dropped. scores_list[m], labels_list[m]: (n_m,) scores and integer
    labels. weights: one per model (default 1). A box with score < skip_box_thr is ignored. Boxes are taken
    by descending weighted score; each joins the cluster whose fused box it overlaps most, if that IoU
    exceeds iou_thr, else starts one. A fused box is the score-weighted mean of its cluster (in float32).
    """
    if conf_type not in CONF_TYPES:
        raise ValueError(f"conf_type must be one of {CONF_TYPES}, got {conf_type!r}")
    weights = np.ones(len(boxes_list)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(weights) != len(boxes_list):
        raise ValueError(f"{len(weights)} weights for {len(boxes_list)} models")
    by_label: dict[int, list[list[float]]] = {}  # label -> rows, in the order first seen
    for model, (boxes, scores, labels) in enumerate(zip(boxes_list, scores_list, labels_list, strict=True)):
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"model {model}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        for box, score, label in zip(boxes, scores, labels):
            if score < skip_box_thr:
                continue
            corners = _ordered_and_clipped(box)
            if corners is not None:
                by_label.setdefault(int(label), []).append(
                    [float(score) * weights[model], weights[model], model, *corners]
                )
    if not by_label:
        return Fused(np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    fused = [_fuse_label(np.array(rows), weights, iou_thr, conf_type) for rows in by_label.values()]
    rows = np.concatenate(fused)
    labels = np.concatenate([np.full(len(f), label, dtype=np.float64) for label, f in zip(by_label, fused)])
    order = np.argsort(rows[:, SCORE])[::-1]
    return Fused(rows[order, COORDS], rows[order, SCORE], labels[order])


def _ordered_and_clipped(box: Sequence[float]) -> tuple[float, float, float, float] | None:
    """Corners ordered and clipped to [0, 1]; None for a box of zero area."""
    x1, x2 = (min(max(v, 0.0), 1.0) for v in sorted((float(box[0]), float(box[2]))))
    y1, y2 = (min(max(v, 0.0), 1.0) for v in sorted((float(box[1]), float(box[3]))))
    return None if (x2 - x1) * (y2 - y1) == 0.0 else (x1, y1, x2, y2)


def _fuse_label(rows: np.ndarray, weights: np.ndarray, iou_thr: float, conf_type: str) -> np.ndarray:
    """Cluster one label's rows (N, 7) into fused rows (M, 7) with rescaled scores."""
    # np.argsort's own tie-breaking, as ensemble_boxes: the processing order decides the clusters
    rows = rows[np.argsort(rows[:, SCORE])[::-1]]
    clusters: list[list[int]] = []  # row indices per fused box
    fused = np.empty((0, rows.shape[1]))
    for index, row in enumerate(rows):
        ious = iou_matrix(fused[:, COORDS], row[None, COORDS])[:, 0]  # (M,)
        best = int(np.argmax(ious)) if len(ious) else -1
        if best >= 0 and ious[best] > iou_thr:
            clusters[best].append(index)
            fused[best] = _mean_row(rows[clusters[best]], conf_type)
        else:
            clusters.append([index])
            fused = np.vstack((fused, row))  # a lone box stays exactly as it came, float64
    for row, members in zip(fused, clusters):
        row[SCORE] = _rescaled_score(row, rows[members], weights, conf_type)
    return fused


def _mean_row(cluster: np.ndarray, conf_type: str) -> np.ndarray:
    """The fused row of a cluster (K, 7): score-weighted mean corners, accumulated in float32."""
    corners = np.zeros(4, dtype=np.float32)
    for row in cluster:  # one by one, each sum rounded to float32: ensemble_boxes' rounding
        corners += row[SCORE] * row[COORDS]
    total = sum(row[SCORE] for row in cluster)
    corners /= total
    score = cluster[:, SCORE].max() if conf_type == "max" else total / len(cluster)
    weight = sum(row[WEIGHT] for row in cluster)
    # MODEL -1: a fused row stands for several models (the cluster's rows keep theirs)
    return np.array([np.float32(score), np.float32(weight), -1, *corners], dtype=np.float64)


def _rescaled_score(fused: np.ndarray, cluster: np.ndarray, weights: np.ndarray, conf_type: str) -> float:
    """WBF's confidence of a fused box from its cluster (K, 7): how much of the models' weight agrees."""
    score, n = fused[SCORE], len(cluster)
    models = np.unique(cluster[:, MODEL]).astype(int)
    if conf_type == "box_and_model_avg":
        return score * n / fused[WEIGHT] * weights[models].sum() / weights.sum()
    if conf_type == "absent_model_aware_avg":
        return score * n / (fused[WEIGHT] + np.delete(weights, models).sum())
    if conf_type == "max":
        return score / weights.max()
    return score * min(len(weights), n) / weights.sum()


@dataclass(frozen=True)
class Region:
    box: Box  # normalized; label is the most common label among the boxes that voted for it
    score: float  # agreement: fraction of rollouts in (0, 1] with a box in this region's cluster


def fuse_rollouts(
    rollouts: Sequence[Sequence[Box]],
    *,
    iou_thr: float = 0.5,
    skip_box_thr: float = 0.0,
    conf_type: str = "avg",
    min_agreement: float = 0.0,
    max_regions: int | None = None,
) -> list[Region]:
    """Fuse the rollouts' boxes into regions, sorted by agreement then area (largest first).

    iou_thr: boxes join a cluster when their IoU with its running fused box exceeds this.
    skip_box_thr: passed to WBF; boxes all score 1.0, so it only drops everything when > 1.
    min_agreement: keep regions with score >= this. max_regions: keep at most this many (None: all).
    """
    if conf_type not in CONF_TYPES:
        raise ValueError(f"conf_type must be one of {CONF_TYPES}, got {conf_type!r}")
    if not 0.0 <= iou_thr <= 1.0:
        raise ValueError(f"iou_thr must be in [0, 1], got {iou_thr}")
    if max_regions is not None and max_regions < 0:
        raise ValueError(f"max_regions must be >= 0 or None, got {max_regions}")

    # WBF warns about (and skips) zero-area boxes; drop them quietly here, they carry no region.
    kept = [[b for b in boxes if fusable(b)] for boxes in rollouts]
    if not any(kept):
        return []

    fused = weighted_boxes_fusion(
        [boxes_to_array(boxes) for boxes in kept],  # one (n_i, 4) array per rollout
        [np.ones(len(boxes)) for boxes in kept],
        [np.zeros(len(boxes)) for boxes in kept],  # class-agnostic: one label for all
        weights=[1.0] * len(kept),
        iou_thr=iou_thr,
        skip_box_thr=skip_box_thr,
        conf_type=conf_type,
    ).boxes
    # WBF averages in float32, which can land a hair outside [0, 1]: from_corners clips.
    fused_boxes = [Box.from_corners(*row) for row in np.asarray(fused, dtype=np.float64)]  # M boxes
    if not fused_boxes:
        return []

    # Vote: each input box goes to its best-overlapping fused box.
    voters: list[set[int]] = [set() for _ in fused_boxes]  # rollout indices per fused box
    labels: list[Counter[str]] = [Counter() for _ in fused_boxes]
    for rollout_index, boxes in enumerate(kept):
        if not boxes:
            continue
        ious = pairwise_iou(boxes, fused_boxes)  # (n_i, M)
        for box, row in zip(boxes, ious, strict=True):
            best = int(np.argmax(row))
            if row[best] > 0:
                voters[best].add(rollout_index)
                labels[best][box.label] += 1

    regions = [
        Region(_with_label(box, label_counts), len(rollout_set) / len(rollouts))
        for box, rollout_set, label_counts in zip(fused_boxes, voters, labels, strict=True)
        if rollout_set
    ]
    regions = [r for r in regions if r.score >= min_agreement]
    regions.sort(key=lambda r: (-r.score, -r.box.area))
    return regions if max_regions is None else regions[:max_regions]


def _with_label(box: Box, label_counts: Counter[str]) -> Box:
    # Ties go to the label seen first (rollout order), which keeps the result deterministic.
    label = label_counts.most_common(1)[0][0] if label_counts else ""
    return Box(box.x1, box.y1, box.x2, box.y2, label)
