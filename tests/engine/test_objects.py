"""The planner reads the objects' scale from sparse annotations and sizes the patch by it."""

import numpy as np
import pytest

from napari_sparse3d.config import Config
from napari_sparse3d.engine.annotations import prepare_annotations
from napari_sparse3d.engine.objects import context_plan, object_extent
from napari_sparse3d.engine.planning import plan_training
from napari_sparse3d.engine.volume import as_volume
from napari_sparse3d.sample_data import evenly_spaced_slices, make_cells, make_organ, sparse_annotations


def _balls(shape, radius, centres):
    zz, yy, xx = np.indices(shape)
    truth = np.zeros(shape, np.uint8)
    for c in centres:
        truth[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius**2] = 1
    return truth


@pytest.mark.parametrize("radius", [4, 10])
def test_extent_of_outlined_balls_is_their_diameter(radius):
    shape = (48, 64, 64)
    truth = _balls(shape, radius, [(24, 20, 20), (24, 44, 44)])
    slices = {0: [24], 1: [20], 2: [44]}
    extent = object_extent(prepare_annotations(sparse_annotations(truth, slices), shape, slices))
    np.testing.assert_allclose(extent, 2 * radius + 1, atol=1)


def test_scribbles_and_empty_annotations():
    shape = (16, 32, 32)
    labels = np.zeros(shape, np.uint8)
    labels[8, 10, 5:25] = 1  # a stroke: its extent is a lower bound of the object
    labels[2, 2, 2:6] = 2
    extent = object_extent(prepare_annotations(labels, shape))
    assert extent is not None and extent[2] == 20
    only_background = np.zeros(shape, np.uint8)
    only_background[3, :5, :5] = 1
    background_only = prepare_annotations(only_background, shape, background_label=1, class_values=[0, 1])
    background_only.target[background_only.target == 1] = 0
    assert object_extent(background_only) is None


def test_context_plan_grows_the_patch_only_for_large_objects():
    assert context_plan(None, 32**3, 4) is None
    assert context_plan(np.array([20.0, 40, 40]), 32**3, 4) is None  # nuclei-like: the tuned small patch stays
    voxels, batch = context_plan(np.array([50.0, 80, 80]), 32**3, 4)
    assert voxels == 4 * 32**3 and batch == 2  # capped growth, a step at most twice the configured cost
    voxels, batch = context_plan(np.array([45.0, 45, 45]), 32**3, 4)
    assert 2 * 32**3 < voxels < 4 * 32**3 and batch == 3


def test_plan_gives_a_large_object_a_large_unflattened_patch():
    config = Config()
    plans = {}
    for name, (image, truth) in {"cells": make_cells((32, 96, 96), seed=1), "organ": make_organ((48, 96, 96), seed=1)}.items():
        slices = evenly_spaced_slices(truth.shape, 2)
        volume = as_volume(image)
        annotations = prepare_annotations(sparse_annotations(truth, slices), truth.shape, slices)
        plans[name] = plan_training([volume], [annotations], spacing=None, config=config, device_type="cpu", init=None)
    cells, organ = plans["cells"], plans["organ"]
    assert cells.patch_size == (16, 48, 48) and cells.config.train.batch_size == 4  # small objects: unchanged
    assert np.prod(organ.patch_size) >= 3 * np.prod(cells.patch_size)
    assert organ.patch_size[0] == organ.patch_size[1]  # not flattened: the object needs context along z too
    assert organ.config.train.batch_size == 2
    fixed = plan_training(
        [as_volume(make_organ((48, 96, 96))[0])],
        [plans["organ"].annotations[0]],
        spacing=None,
        config=config.replace(train={"plan_from_objects": False}),
        device_type="cpu",
        init=None,
    )
    assert np.prod(fixed.patch_size) == 32**3  # the configured patch budget
