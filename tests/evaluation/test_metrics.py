import numpy as np
import pytest

from napari_sparse3d.evaluation.metrics import annotated_slice_mask, dice_per_class, iou_per_class, mean_foreground_dice


def test_dice_and_iou_by_hand():
    truth = np.array([0, 1, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 0, 2, 1])
    d = dice_per_class(pred, truth)
    assert d[1] == pytest.approx(2 * 2 / (3 + 3))
    assert d[2] == pytest.approx(2 * 1 / (1 + 2))
    assert iou_per_class(pred, truth)[1] == pytest.approx(2 / 4)
    assert mean_foreground_dice(pred, truth) == pytest.approx((d[1] + d[2]) / 2)


def test_mask_restricts_scoring():
    truth = np.array([1, 1, 0, 0])
    pred = np.array([1, 0, 0, 0])
    assert dice_per_class(pred, truth, classes=[1], mask=np.array([True, False, True, True]))[1] == 1.0


def test_annotated_slice_mask():
    mask = annotated_slice_mask((4, 5, 6), {0: [1], 2: [0, 5]})
    assert mask[1].all() and mask[:, :, 0].all() and mask[:, :, 5].all()
    assert mask.sum() == 5 * 6 + 2 * (4 * 5) - 2 * 5


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        dice_per_class(np.zeros(3), np.zeros(4))
