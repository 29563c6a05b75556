import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.boxes import Box
from engine.fusion import CONF_TYPES, Region, fusable, fuse_rollouts, weighted_boxes_fusion

CAT = Box(0.2, 0.3, 0.5, 0.6, "cat")
DOG = Box(0.6, 0.1, 0.9, 0.4, "dog")


def jittered(box: Box, rng: np.random.Generator, sigma: float = 0.01) -> Box:
    return Box.from_corners(*(np.array(box.as_list()) + rng.normal(0, sigma, 4)), box.label)


def fuse_strictly(rollouts, **kwargs) -> list[Region]:
    """fuse_rollouts with every warning turned into an error (numpy warns on a division by zero)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fuse_rollouts(rollouts, **kwargs)


def test_agreeing_rollouts_fuse_into_one_region_near_the_mean():
    rng = np.random.default_rng(0)
    rollouts = [[jittered(CAT, rng)] for _ in range(8)]
    (region,) = fuse_strictly(rollouts)
    assert region.score == 1.0
    mean = np.mean([r[0].as_list() for r in rollouts], axis=0)
    np.testing.assert_allclose(region.box.as_list(), mean, atol=1e-5)  # WBF averages in float32
    assert region.box.label == "cat"


def test_disjoint_boxes_stay_separate():
    rng = np.random.default_rng(1)
    rollouts = [[jittered(CAT, rng), jittered(DOG, rng)] for _ in range(8)]
    regions = fuse_strictly(rollouts)
    assert len(regions) == 2
    assert {r.box.label for r in regions} == {"cat", "dog"}
    assert all(r.score == 1.0 for r in regions)


def test_score_is_fraction_of_rollouts_counting_empty_ones():
    regions = fuse_strictly([[CAT, DOG], [CAT], [], []])
    assert [(r.box.label, r.score) for r in regions] == [("cat", 0.5), ("dog", 0.25)]


def test_two_boxes_from_one_rollout_count_once():
    # WBF's own 'avg' confidence would be 2/4 here: one rollout, two boxes in the cluster.
    near_copy = Box(0.21, 0.3, 0.51, 0.6)
    (region,) = fuse_strictly([[CAT, near_copy], [], [], []])
    assert region.score == 0.25


def test_sorted_by_score_then_area():
    small = Box(0.0, 0.0, 0.1, 0.1, "small")
    big = Box(0.5, 0.5, 1.0, 1.0, "big")
    regions = fuse_strictly([[small, big, CAT], [CAT], [CAT, small, big]])
    assert [r.box.label for r in regions] == ["cat", "big", "small"]
    assert [r.score for r in regions] == pytest.approx([1.0, 2 / 3, 2 / 3])


def test_min_agreement_and_max_regions():
    rollouts = [[CAT, DOG], [CAT], [CAT], []]
    assert [r.box.label for r in fuse_strictly(rollouts, min_agreement=0.5)] == ["cat"]
    assert [r.box.label for r in fuse_strictly(rollouts, min_agreement=0.25)] == ["cat", "dog"]
    assert [r.box.label for r in fuse_strictly(rollouts, max_regions=1)] == ["cat"]
    assert fuse_strictly(rollouts, max_regions=0) == []


def test_majority_label_wins():
    rollouts = [[Box(0.2, 0.3, 0.5, 0.6, label)] for label in ["cat", "kitten", "cat"]]
    (region,) = fuse_strictly(rollouts)
    assert region.box.label == "cat"


@pytest.mark.parametrize("rollouts", [[], [[]], [[], [], []]])
def test_nothing_to_fuse(rollouts):
    assert fuse_strictly(rollouts) == []


def test_zero_area_boxes_are_dropped_without_warnings():
    line = Box(0.2, 0.2, 0.2, 0.8)
    assert fuse_strictly([[line], []]) == []
    (region,) = fuse_strictly([[line, CAT], [CAT]])
    assert region.score == 1.0


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_every_conf_type_is_accepted(conf_type):
    regions = fuse_strictly([[CAT, DOG], [CAT], []], conf_type=conf_type)
    assert [r.box.label for r in regions] == ["cat", "dog"]
    assert [r.score for r in regions] == pytest.approx([2 / 3, 1 / 3])


def test_unknown_conf_type_is_rejected():
    with pytest.raises(ValueError, match="conf_type"):
        fuse_rollouts([[CAT]], conf_type="mean")


def test_iou_threshold_controls_clustering():
    shifted = Box(0.3, 0.3, 0.6, 0.6, "cat")  # IoU with CAT = 0.5
    assert len(fuse_strictly([[CAT], [shifted]], iou_thr=0.4)) == 1
    assert len(fuse_strictly([[CAT], [shifted]], iou_thr=0.6)) == 2


unit = st.floats(0.0, 1.0)
random_boxes = st.builds(Box.from_corners, unit, unit, unit, unit, st.sampled_from(["a", "b", ""]))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(random_boxes, max_size=5), max_size=8),
    st.floats(0.1, 0.9),
    st.floats(0.0, 1.0),
    st.sampled_from(CONF_TYPES),
)
def test_fuzz_regions_are_valid_and_sorted(rollouts, iou_thr, min_agreement, conf_type):
    regions = fuse_strictly(rollouts, iou_thr=iou_thr, min_agreement=min_agreement, conf_type=conf_type)
    n = len(rollouts)
    n_boxes = sum(fusable(b) for boxes in rollouts for b in boxes)
    assert len(regions) <= n_boxes
    for region in regions:
        assert min_agreement <= region.score <= 1.0
        assert region.score * n == pytest.approx(round(region.score * n))  # a whole number of rollouts
        assert region.box.area > 0
    keys = [(-r.score, -r.box.area) for r in regions]
    assert keys == sorted(keys)
    if min_agreement == 0.0 and n_boxes:
        assert regions  # every box votes for some region


def test_boxes_thinner_than_float32_resolution_are_not_fused():
    sliver = Box(0.0, 0.0, 1e-149, 1.0)
    assert fuse_rollouts([[sliver, sliver]]) == []


# Our weighted_boxes_fusion against ensemble_boxes' (a dev dependency, for this proof only).
# Coordinates include values outside [0, 1], swapped corners and repeats (zero-area boxes, exact IoU
# ties); scores and weights repeat too, so that sort ties and threshold boundaries are exercised.
coordinate = st.one_of(st.floats(-0.2, 1.2), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
model_boxes = st.lists(
    st.tuples(
        st.tuples(coordinate, coordinate, coordinate, coordinate),
        st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.5, 1.0])),  # score
        st.integers(0, 2),  # label
    ),
    max_size=10,
)


def as_arrays(models):
    boxes = [np.array([b for b, _, _ in m], dtype=np.float64).reshape(-1, 4) for m in models]
    scores = [np.array([s for _, s, _ in m], dtype=np.float64) for m in models]
    labels = [np.array([label for _, _, label in m]) for m in models]
    return boxes, scores, labels


@settings(max_examples=400, deadline=None)
@given(
    models=st.lists(model_boxes, max_size=8),  # past 16 boxes a label, numpy's sort is not stable
    weights=st.one_of(st.none(), st.lists(st.sampled_from([0.5, 1.0, 2.0]) | st.floats(0.1, 3.0))),
    iou_thr=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.25, 0.5, 0.55])),
    skip_box_thr=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    conf_type=st.sampled_from(CONF_TYPES),
)
def test_fuzz_equals_ensemble_boxes(models, weights, iou_thr, skip_box_thr, conf_type):
    reference = pytest.importorskip("ensemble_boxes").weighted_boxes_fusion
    if weights is not None:
        weights = (weights * (len(models) // max(len(weights), 1) + 1))[: len(models)] or None
    boxes, scores, labels = as_arrays(models)
    options = {"weights": weights, "iou_thr": iou_thr, "skip_box_thr": skip_box_thr, "conf_type": conf_type}
    with warnings.catch_warnings():
        # it warns about every box it clips, swaps or skips; both divide 0 by 0 for a cluster of zero scores
        warnings.simplefilter("ignore")
        expected = reference(boxes, scores, labels, **options)
        got = weighted_boxes_fusion(boxes, scores, labels, **options)
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs, strict=True)  # bit for bit, NaN where it has NaN


def test_wbf_fuses_a_cluster_into_its_score_weighted_mean():
    boxes = [np.array([[0.1, 0.1, 0.5, 0.5]]), np.array([[0.2, 0.2, 0.6, 0.6], [0.8, 0.8, 0.9, 0.9]])]
    scores = [np.array([1.0]), np.array([0.5, 0.9])]
    labels = [np.array([0]), np.array([0, 1])]
    fused = weighted_boxes_fusion(boxes, scores, labels, iou_thr=0.3)  # the first two: IoU 0.39
    np.testing.assert_allclose(
        fused.boxes, [[0.2 / 1.5, 0.2 / 1.5, 0.8 / 1.5, 0.8 / 1.5], [0.8, 0.8, 0.9, 0.9]], atol=1e-6
    )
    # avg: the mean score of a cluster, times min(models, its boxes) / the models' total weight
    np.testing.assert_allclose(fused.scores, [0.75, 0.9 / 2], atol=1e-6)
    assert fused.labels.tolist() == [0.0, 1.0]


def test_wbf_of_nothing_is_empty():
    fused = weighted_boxes_fusion([np.zeros((0, 4))], [np.zeros(0)], [np.zeros(0)])
    assert fused.boxes.shape == (0, 4) and fused.scores.shape == fused.labels.shape == (0,)


def test_wbf_refuses_mismatched_inputs():
    one = ([np.zeros((1, 4))], [np.ones(1)], [np.zeros(1)])
    with pytest.raises(ValueError, match="weights"):
        weighted_boxes_fusion(*one, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="2 scores"):
        weighted_boxes_fusion([np.zeros((1, 4))], [np.ones(2)], [np.zeros(1)])
    with pytest.raises(ValueError, match="conf_type"):
        weighted_boxes_fusion(*one, conf_type="mean")
