"""Volumes no larger than the network's stride: padded patches and windows, never a one-voxel deepest level.

A 1x1x1 level cannot be instance-normalised (torch refuses it at batch 1, and at a
larger batch it normalises every channel to its bias), so training and prediction pad
such a volume to two strides along the axes the network downsamples.
"""

import numpy as np
import pytest
import torch

import napari_sparse3d
from napari_sparse3d.config import Config, PredictConfig
from napari_sparse3d.engine.prediction import predict_blocks
from napari_sparse3d.engine.preprocess import side_limits
from napari_sparse3d.engine.volume import as_volume


def test_side_limits_pad_only_when_the_deepest_level_would_be_one_voxel():
    assert side_limits((8, 8, 8), (8, 8, 8)) == [16, 16, 16]
    assert side_limits((3, 1, 2), (4, 8, 8), patch=(8, 8, 16)) == [8, 8, 16]  # the patch's side, if smaller
    assert side_limits((1, 1, 1), (1, 8, 8)) == [1, 16, 16]  # an axis the network keeps is not padded
    assert side_limits((2, 200, 180), (8, 8, 8)) == [8, 200, 184]  # more than one voxel deep down: as before
    assert side_limits((20, 36, 28), (4, 4, 4)) == [20, 36, 28]


def _config() -> Config:
    # no patch size: the planner chooses it from the volume
    return Config.from_dict({"model": {"levels": 3, "base_features": 4}, "train": {"batch_size": 1, "warmup_steps": 0}})


@pytest.mark.parametrize("shape", [(4, 4, 4), (3, 3, 3), (2, 1, 1), (1, 2, 2)])
def test_a_volume_within_one_stride_trains_and_predicts(shape):
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[0, 0, 0], labels[-1, -1, -1] = 1, 2
    res = napari_sparse3d.run(image, labels, max_iterations=2, config=_config(), device="cpu")
    assert res.labels.shape == shape and set(np.unique(res.labels)) <= {1, 2}
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    patch, divisor = res.model.sparse3d.patch_size, res.model.divisor
    assert divisor == (4, 4, 4) and all(p >= 2 * d for p, d in zip(patch, divisor)), patch


@pytest.fixture
def model(small_volume):
    image, labels, _, slices = small_volume
    return napari_sparse3d.run(image, labels, annotated_slices=slices, max_iterations=2, config=_config(), device="cpu").model


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2), (4, 4, 4), (1, 40, 40)])
def test_a_model_predicts_volumes_smaller_than_its_stride(model, shape):
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    labels = napari_sparse3d.predict(image, model, device="cpu")
    assert labels.shape == shape and set(np.unique(labels)) <= {0, 1, 2}


def test_a_window_that_leaves_one_voxel_is_refused(model):
    volume = as_volume(np.zeros((8, 8, 8), np.float32))
    config = PredictConfig(window=tuple(model.divisor))
    with pytest.raises(ValueError, match=r"config.predict.window \(4, 4, 4\) leaves one voxel at the network's deepest level"):
        next(predict_blocks(volume, model, device="cpu", config=config))
