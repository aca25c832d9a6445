"""Normalisation chosen for transfer: "image" (each image its own statistics) or "dataset" (stored ones)."""

import dataclasses

import numpy as np
import pytest
import torch

import napari_sparse3d
from napari_sparse3d.config import Config
from napari_sparse3d.engine import preprocess
from napari_sparse3d.engine.model import UNet3D
from napari_sparse3d.engine.prediction import predict_blocks, predict_region, predict_volume
from napari_sparse3d.engine.preprocess import Normalization, compute_normalization, pooled_normalization
from napari_sparse3d.engine.trained import ModelInfo
from napari_sparse3d.engine.volume import as_volume
from napari_sparse3d.evaluation.metrics import mean_foreground_dice
from napari_sparse3d.io.checkpoint import load_checkpoint, save_checkpoint
from napari_sparse3d.sample_data import evenly_spaced_slices, make_cells, sparse_annotations


@pytest.fixture(scope="module")
def cells():
    image, truth = make_cells((24, 64, 64), seed=1)
    slices = evenly_spaced_slices(image.shape, 2)
    return image, truth, sparse_annotations(truth, slices), slices


def _train(cells, mode):
    image, _, labels, slices = cells
    config = Config.from_dict(
        {
            "model": {"levels": 3, "base_features": 8, "deep_supervision": False},
            "train": {"patch_size": [16, 32, 32], "batch_size": 2, "warmup_steps": 0, "learning_rate": 0.01,
                      "normalization": mode},
        }
    )
    res = napari_sparse3d.run(image, labels, annotated_slices=slices, max_iterations=60, config=config, device="cpu")
    assert res.model.sparse3d.normalization.mode == mode  # the configured mode is planned and stored
    return res.model


@pytest.mark.parametrize("mode", ["image", "dataset"])
def test_per_image_normalisation_makes_a_model_robust_to_brightness(cells, mode):
    """A new volume 3 * image + 500 (another gain and offset): "image" mode sees the same volume, "dataset" not."""
    image, truth = cells[:2]
    model = _train(cells, mode)
    base = napari_sparse3d.predict(image, model, device="cpu")
    assert mean_foreground_dice(base, truth) > 0.8  # a model worth transferring
    brighter = napari_sparse3d.predict(3 * image + 500, model, device="cpu")
    agreement = mean_foreground_dice(brighter, base)
    if mode == "image":
        assert agreement > 0.99
    else:
        assert agreement < 0.8


def test_image_mode_normalises_a_gain_and_offset_away():
    volume = as_volume(make_cells((16, 32, 32), seed=2)[0])
    other = as_volume(3 * volume.read()[0] + 500)
    stored = compute_normalization(volume, mode="image")
    block = other.read()
    np.testing.assert_allclose(stored.for_volume(other).apply(block.copy()), stored.apply(volume.read()), atol=1e-4)
    dataset = dataclasses.replace(stored, mode="dataset")
    assert dataset.for_volume(other) is dataset
    assert stored.for_volume(volume) == stored  # the training volume gets exactly the stored statistics
    with pytest.raises(ValueError, match="2 channels"):
        stored.for_volume(as_volume(np.zeros((2, 4, 8, 8), np.float32), channel_axis=0))


def test_normalization_round_trips_with_its_mode(tmp_path, tiny_checkpoint):
    for mode in ("image", "dataset"):
        norm = Normalization((0.5,), (9.0,), (3.0,), (2.0,), mode)
        assert norm.to_dict()["mode"] == mode
        assert Normalization.from_dict(norm.to_dict()) == norm
    # through a checkpoint file
    model = tiny_checkpoint[0]
    assert model.sparse3d.normalization.mode == "image"  # the configuration's default
    path = save_checkpoint(model, tmp_path / "image.pt")
    assert load_checkpoint(path).sparse3d.normalization == model.sparse3d.normalization
    model.sparse3d = dataclasses.replace(model.sparse3d, normalization=dataclasses.replace(model.sparse3d.normalization, mode="dataset"))
    try:
        assert load_checkpoint(save_checkpoint(model, tmp_path / "dataset.pt")).sparse3d.normalization.mode == "dataset"
    finally:
        model.sparse3d = load_checkpoint(path).sparse3d


def test_an_old_checkpoint_without_mode_reads_as_dataset(tiny_checkpoint):
    old = {"lower": [0.0], "upper": [1.0], "mean": [0.5], "std": [0.3]}  # written before the mode existed
    assert Normalization.from_dict(old).mode == "dataset"
    payload = torch.load(tiny_checkpoint[1], weights_only=True)
    del payload["info"]["normalization"]["mode"]
    assert load_checkpoint(payload).sparse3d.normalization.mode == "dataset"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mode": "per-slice"}, r"normalization\.mode must be one of \('image', 'dataset'\), got 'per-slice'"),
        ({"mode": 3}, r"normalization\.mode must be one of"),
        ({"std": [0.0]}, "std > 0"),
        ({"upper": [-1e9]}, "lower <= upper"),
        ({"mean": [float("nan")]}, r"normalization\.mean must be a non-empty list of finite numbers"),
        ({"mean": "high"}, r"normalization\.mean must be"),
        ({"lower": [0.0, 0.0]}, "one value per channel"),
    ],
)
def test_a_bad_normalization_is_a_clear_error(change, message, tiny_checkpoint):
    good = {"lower": [0.0], "upper": [1.0], "mean": [0.5], "std": [0.3], "mode": "image"}
    with pytest.raises(ValueError, match=message):
        Normalization.from_dict({**good, **change})
    payload = torch.load(tiny_checkpoint[1], weights_only=True)
    payload["info"]["normalization"].update(change)
    with pytest.raises(ValueError, match="checkpoint dict.*does not describe a valid network.*normalization"):
        load_checkpoint(payload)


def test_bad_modes_are_refused_where_made():
    with pytest.raises(ValueError, match="normalization mode must be one of"):
        Normalization((0.0,), (1.0,), (0.5,), (0.3,), "both")
    with pytest.raises(ValueError, match="mode must be one of"):
        compute_normalization(as_volume(np.ones((4, 8, 8), np.float32)), mode="global")
    with pytest.raises(ValueError, match="mode must be one of"):
        pooled_normalization([as_volume(np.ones((4, 8, 8), np.float32))], mode="global")
    del_missing = {"lower": [0.0], "upper": [1.0], "mean": [0.5]}
    with pytest.raises(ValueError, match=r"normalization\.std is missing"):
        Normalization.from_dict(del_missing)


def test_pooled_normalization_covers_every_volume():
    rng = np.random.default_rng(0)
    dim, bright = rng.normal(10, 1, (8, 16, 16)), rng.normal(100, 5, (16, 16, 16))
    one = pooled_normalization([as_volume(dim)])
    assert one == dataclasses.replace(compute_normalization(as_volume(dim)), mode="dataset")
    pooled = pooled_normalization([as_volume(dim), as_volume(bright)])
    assert pooled.mode == "dataset"
    assert pooled.lower[0] < 12 and pooled.upper[0] > 95  # both volumes are in the percentiles
    all_voxels = np.concatenate([dim.ravel(), bright.ravel()])
    assert pooled.mean[0] == pytest.approx(all_voxels.mean(), rel=0.02)  # sized by voxels: 1/3 dim, 2/3 bright
    assert pooled_normalization([as_volume(dim)], mode="image").mode == "image"
    with pytest.raises(ValueError, match="same number of channels"):
        pooled_normalization([as_volume(dim), as_volume(np.zeros((2, 4, 8, 8)), channel_axis=0)])
    with pytest.raises(ValueError, match="at least one volume"):
        pooled_normalization([])
    with pytest.raises(ValueError, match=r"images\[1\] contains 256 NaN"):
        pooled_normalization([as_volume(dim), as_volume(np.where(np.arange(8)[:, None, None] == 0, np.nan, dim))])


def _image_mode_model():
    cfg = Config.from_dict(
        {
            "model": {"levels": 3, "base_features": 4, "pixel_classifier": False},
            "train": {"patch_size": [8, 16, 16], "precision": "fp32"},
            "predict": {"window": "patch", "overlap": 0.5, "batch_size": 3, "mirror_tta": False},
        }
    )
    torch.manual_seed(0)
    model = UNet3D(1, 2, cfg.model).eval()
    norm = Normalization((0.0,), (1.0,), (0.5,), (0.3,), "image")
    model.sparse3d = ModelInfo(cfg, [0, 1], norm, (8, 16, 16), None, 1)
    return model


def test_image_statistics_are_computed_once_per_volume_never_per_tile(monkeypatch):
    """Per-tile statistics would make the result depend on the tiling; a gradient makes every tile differ."""
    rng = np.random.default_rng(0)
    image = (rng.random((13, 40, 29)) + np.linspace(0, 20, 29)).astype(np.float32)
    model = _image_mode_model()
    calls = []
    real = preprocess.compute_normalization
    monkeypatch.setattr(preprocess, "compute_normalization", lambda v, **kw: calls.append(v.spatial_shape) or real(v, **kw))
    whole = list(predict_blocks(as_volume(image), model, device="cpu"))
    assert calls == [image.shape]
    model.sparse3d.config = model.sparse3d.config.replace(predict={"tile_voxels": 2000})
    calls.clear()
    tiled = list(predict_blocks(as_volume(image), model, device="cpu"))
    assert len(tiled) > 4 and calls == [image.shape]
    probs = np.zeros((2, *image.shape), np.float32)
    for block in tiled:
        probs[(slice(None), *block.region)] = block.probabilities
    np.testing.assert_allclose(probs, whole[0].probabilities, atol=1e-5)
    # the statistics are the volume's own, not the stored ones
    expected = predict_volume(as_volume(image), model, device="cpu", normalization=real(as_volume(image), mode="image"))
    stored = predict_volume(as_volume(image), model, device="cpu", normalization=model.sparse3d.normalization)
    np.testing.assert_array_equal(predict_volume(as_volume(image), model, device="cpu")[0], expected[0])
    assert not np.array_equal(expected[0], stored[0])


def test_a_region_is_normalised_like_the_whole_volume(monkeypatch):
    rng = np.random.default_rng(1)
    image = (rng.random((13, 40, 29)) + np.linspace(0, 20, 29)).astype(np.float32)
    model = _image_mode_model()
    volume = as_volume(image)
    region = (slice(6, 7), slice(0, 40), slice(0, 29))
    calls = []
    real = preprocess.compute_normalization
    monkeypatch.setattr(preprocess, "compute_normalization", lambda v, **kw: calls.append(v.spatial_shape) or real(v, **kw))
    default = list(predict_region(volume, model, region, device="cpu"))
    assert calls == [image.shape]  # the whole volume's statistics, once
    calls.clear()
    given = list(predict_region(volume, model, region, device="cpu", normalization=real(volume, mode="image")))
    assert calls == []  # a caller (the napari preview) may pass them, computed once
    for a, b in zip(default, given):
        assert a.region == b.region
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
    # and with the statistics of the region alone the prediction would differ
    box = default[0].region
    own = real(as_volume(image[box]), mode="image")
    other = list(predict_region(volume, model, region, device="cpu", normalization=own))
    assert not np.allclose(other[0].probabilities, default[0].probabilities, atol=1e-3)
