"""Uncertainty, uncertain slices and accepting corrected slices, on plain arrays."""


import numpy as np
import pytest

from napari_sparse3d.loop.corrections import accept_slices, uncertain_slices, uncertainty
from napari_sparse3d.loop.slices import SliceRegister


def test_uncertain_slices_skip_marked_and_neighbours():
    u = np.zeros((12, 8, 8), np.float32)
    u[5] = 1.0
    u[6] = 0.9
    u[9] = 0.5
    assert uncertain_slices(u, 0, marked=[], count=2) == [5, 9]  # 6 is a neighbour of 5
    assert uncertain_slices(u, 0, marked=[5], count=1) == [9]  # 5 marked, 6 next to it
    assert uncertain_slices(u, 0, marked=[5], count=1, min_gap=0) == [6]


def test_uncertainty_is_normalised_entropy():
    p = np.zeros((3, 2, 1, 1), np.float32)
    p[:, 0] = 1 / 3
    p[1, 1] = 1.0
    u = uncertainty(p)
    assert u.shape == (2, 1, 1)
    assert u[0, 0, 0] == pytest.approx(1.0, abs=1e-5) and u[1, 0, 0] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="K >= 2"):
        uncertainty(np.ones((1, 4, 4, 4)))


def test_accept_slices_copies_prediction_and_marks():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[0, 0, 0] = 3
    prediction = np.ones_like(labels)
    prediction[2, 1] = 0
    register = SliceRegister(labels.shape)
    accepted = accept_slices(labels, prediction, register, {0: [2], 2: [5]})
    assert accepted == [(0, 2), (2, 5)]
    assert register.as_dict() == {0: [2], 2: [5]}
    np.testing.assert_array_equal(labels[2], prediction[2])
    np.testing.assert_array_equal(labels[:, :, 5], prediction[:, :, 5])
    assert labels[0, 0, 0] == 3 and labels[1, 0, 0] == 0  # the rest untouched
    with pytest.raises(ValueError, match="shape"):
        accept_slices(labels, prediction[:2], register, {0: [0]})
