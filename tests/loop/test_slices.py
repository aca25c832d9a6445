"""Which slices are annotated and where to annotate next, on plain arrays."""


import numpy as np
import pytest

from napari_sparse3d.loop.slices import SliceRegister, label_counts, next_even_slice


def test_register_marks_unmarks_and_notifies():
    register = SliceRegister((10, 20, 30))
    calls = []
    register.on_change(lambda: calls.append(1))
    register.mark(0, 3)
    register.mark(0, 3)  # no change, no call
    assert register.toggle(2, 29) is True
    assert register.as_dict() == {0: [3], 2: [29]}
    assert register.toggle(0, 3) is False
    assert register.as_dict() == {2: [29]}
    assert len(calls) == 3
    mask = register.mask()
    assert mask.sum() == 10 * 20 and mask[:, :, 29].all()
    with pytest.raises(ValueError, match=r"slice index must be in \[0, 19\] along axis 1, got 20"):
        register.mark(1, 20)
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2, got 3"):
        register.mark(3, 0)


def test_even_slices_spread_over_the_axis():
    marked = []
    for _ in range(3):
        marked.append(next_even_slice(31, marked))
    assert marked == [15, 7, 23]
    # ties go to the slice nearest the one on screen
    assert next_even_slice(31, [15], current=28) == 23
    # every slice taken: stay where we are
    assert next_even_slice(3, [0, 1, 2], current=1) == 1


def test_counts_include_background_of_marked_slices():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, :2, :2] = 2
    labels[3, 0, 0] = 1
    register = SliceRegister(labels.shape, {0: [1]})
    assert label_counts(labels) == {1: 1, 2: 4}
    assert label_counts(labels, register) == {0: 30 - 4, 1: 1, 2: 4}
