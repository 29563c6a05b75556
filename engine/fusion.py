"""Weighted Boxes Fusion over the N rollouts of the perceive stage.

Each rollout is one sampled answer of the model: a list of boxes (normalized). WBF (ensemble_boxes) clusters
boxes across rollouts class-agnostically and averages each cluster into one fused box. Every box enters
with score 1.0 and every rollout with weight 1, so a fused box is the plain mean of its cluster.

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

import numpy as np
from ensemble_boxes import weighted_boxes_fusion

from engine.boxes import Box, boxes_to_array, pairwise_iou

# The conf_type values ensemble_boxes 1.0.9 accepts; it calls exit() on anything else, so we check first.
# With unit scores and weights they only change WBF's own confidence, which Region.score replaces.
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


# WBF computes in float32: a side thinner than this (far below a pixel of any image) collapses to zero there.
MIN_SIDE = 1e-6


def fusable(box: Box) -> bool:
    return box.width > MIN_SIDE and box.height > MIN_SIDE


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

    fused, _, _ = weighted_boxes_fusion(
        [boxes_to_array(boxes) for boxes in kept],  # one (n_i, 4) array per rollout
        [np.ones(len(boxes)) for boxes in kept],
        [np.zeros(len(boxes)) for boxes in kept],  # class-agnostic: one label for all
        weights=[1.0] * len(kept),
        iou_thr=iou_thr,
        skip_box_thr=skip_box_thr,
        conf_type=conf_type,
    )
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
