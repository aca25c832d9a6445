"""instance_f1: one-to-one matching of instances by IoU, from a sparse contingency table."""

import numpy as np
import pytest
from scipy import ndimage

from napari_sparse3d.evaluation.metrics import instance_f1


def test_identical_instances_score_one_whatever_their_ids():
    truth = np.zeros((6, 8, 8), np.uint16)
    truth[1:3, 1:4, 1:4] = 3
    truth[3:6, 4:8, 4:8] = 9
    truth[0, 7, 0] = 12
    pred = np.select([truth == 3, truth == 9, truth == 12], [2**40, 5, 1], 0).astype(np.uint64)
    scores = instance_f1(pred, truth)
    assert scores == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 3, "fp": 0, "fn": 0, "mean_iou": 1.0,
                      "n_pred": 3, "n_true": 3}


def test_a_split_object_is_a_match_and_a_false_positive_or_two_false_positives_and_a_miss():
    truth = np.zeros((10, 10), np.int32)
    truth[:, :] = 1  # one object of 100 voxels
    pred = np.ones((10, 10), np.int32)
    pred[:, 6:] = 2  # split 60 / 40: the larger part still matches (IoU 0.6)
    scores = instance_f1(pred, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 1, 0)
    assert scores["precision"] == 0.5 and scores["recall"] == 1.0 and scores["mean_iou"] == pytest.approx(0.6)
    pred[:, 5:] = 2  # split in halves: IoU 0.5 is not above 0.5, nothing matches
    scores = instance_f1(pred, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 2, 1)
    assert scores["f1"] == 0.0 and scores["mean_iou"] == 0.0
    # merged: true objects of 60 and 40 voxels predicted as one; the larger is matched (IoU 0.6), the other missed
    pred[:, 5] = 1
    merged = instance_f1(truth, pred)
    assert (merged["tp"], merged["fp"], merged["fn"]) == (1, 0, 1) and merged["mean_iou"] == pytest.approx(0.6)


def test_empty_prediction_and_empty_truth():
    truth = np.zeros((4, 4), np.uint8)
    truth[:2, :2] = 1
    truth[2:, 2:] = 2
    empty = np.zeros_like(truth)
    scores = instance_f1(empty, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 0, 2)
    assert scores["precision"] == 0.0 and scores["recall"] == 0.0 and scores["f1"] == 0.0
    scores = instance_f1(truth, empty)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (0, 2, 0) and scores["f1"] == 0.0 and scores["recall"] == 0.0
    both = instance_f1(empty, empty)
    assert both["f1"] == both["precision"] == both["recall"] == 1.0 and both["n_true"] == 0


def test_a_small_case_worked_by_hand():
    truth = np.zeros(16, np.uint8)
    truth[0:4] = 1  # A, 4 voxels
    truth[6:10] = 2  # B, 4 voxels
    truth[12:14] = 3  # C, 2 voxels
    pred = np.zeros(16, np.uint8)
    pred[0:3] = 7  # X: X∩A = 3, X∪A = 4 -> 0.75
    pred[5:10] = 8  # Y: Y∩B = 4, Y∪B = 5 -> 0.8
    pred[11:13] = 9  # W: W∩C = 1, W∪C = 3 -> 1/3
    pred[14:16] = 4  # Z: overlaps nothing
    scores = instance_f1(pred, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 2, 1)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert scores["mean_iou"] == pytest.approx((0.75 + 0.8) / 2)
    # a stricter threshold: 0.75 is not above 0.75
    strict = instance_f1(pred, truth, iou=0.75)
    assert strict["tp"] == 1 and strict["mean_iou"] == pytest.approx(0.8)


def _brute_force(pred, truth, threshold):
    """Every pair of masks (what the metric must not do), counting pairs above the threshold."""
    matched = []
    for p in np.unique(pred[pred > 0]):
        for t in np.unique(truth[truth > 0]):
            a, b = pred == p, truth == t
            score = (a & b).sum() / (a | b).sum()
            if score > threshold:
                matched.append(score)
    return len(matched), (float(np.mean(matched)) if matched else 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_all_pairs_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.normal(size=(3, 12, 24, 24)), (0, 2, 2, 2))
    truth = ndimage.label(blobs[0] > 0.05)[0]
    pred = ndimage.label((blobs[0] + 0.2 * blobs[1]) > 0.05)[0] * 3  # a noisy version, other ids
    for threshold in (0.5, 0.7):
        tp, mean_iou = _brute_force(pred, truth, threshold)
        scores = instance_f1(pred, truth, iou=threshold)
        assert scores["tp"] == tp and scores["mean_iou"] == pytest.approx(mean_iou)
        assert scores["fp"] == len(np.unique(pred)) - 1 - tp and scores["fn"] == len(np.unique(truth)) - 1 - tp
    assert 0 < instance_f1(pred, truth)["tp"] < len(np.unique(truth)) - 1  # the case is not trivial


def test_bad_input_is_refused_naming_the_argument():
    a = np.zeros((3, 3), np.uint8)
    with pytest.raises(ValueError, match="pred and truth must have the same shape"):
        instance_f1(a, np.zeros((3, 4), np.uint8))
    with pytest.raises(TypeError, match="pred must be an integer instance label array"):
        instance_f1(a.astype(float), a)
    with pytest.raises(TypeError, match="truth must be an integer instance label array"):
        instance_f1(a, a.astype(bool))
    with pytest.raises(ValueError, match=r"iou must be in \[0.5, 1\)"):
        instance_f1(a, a, iou=0.3)
