"""predict(..., spacing=): an image at another voxel size is predicted on the model's grid.

The task is chosen so that voxel size matters: the image shows a bright core of
radius 4 and the label is the ball of radius 7 around it, so the network must
learn to reach 3 voxels beyond what it sees.  A model trained at spacing
(1, 1, 1) that is shown an image at (2, 1, 1) as it is reaches 3 voxels = 6 units
in z and over-segments by about half; resampled to the model's grid it does not.
(A task a per-voxel threshold solves would be spacing-invariant and test nothing.)
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import napari_sparse3d
from napari_sparse3d.cli import main
from napari_sparse3d.config import Config
from napari_sparse3d.engine import resample
from napari_sparse3d.engine.prediction import predict_volume
from napari_sparse3d.engine.resample import ResampledVolume, grid_shape, model_grid, spacing_differs
from napari_sparse3d.engine.volume import as_volume
from napari_sparse3d.io.arrays import load_array

CORE, RADIUS = 4.0, 7.0
EXTENT = (48, 48, 48)  # physical size, in units of the training spacing


def _centres(n=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        c = rng.uniform(9, np.asarray(EXTENT) - 9)
        if all(np.linalg.norm(c - o) >= 2 * RADIUS + 1 for o in out):
            out.append(c)
    return np.array(out)


def _render(spacing, seed):
    """Image and truth of the same objects, sampled at voxel centres ``(i + 0.5) * spacing``."""
    shape = tuple(int(round(e / s)) for e, s in zip(EXTENT, spacing))
    zz, yy, xx = np.meshgrid(*((np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)), indexing="ij")
    distance = np.full(shape, np.inf)
    for c in _centres():
        distance = np.minimum(distance, np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2))
    noise = np.random.default_rng(seed).normal(0, 0.1, shape)
    image = (np.clip(CORE + 0.5 - distance, 0, 1) + noise).astype(np.float32)
    return image, (distance < RADIUS).astype(np.uint8)


def _dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def model():
    """Trained at spacing (1, 1, 1) on a fully labelled volume (100 steps, about 25 s on 2 cores)."""
    image, truth = _render((1, 1, 1), seed=0)
    config = Config.from_dict(
        {
            "model": {"levels": 3, "base_features": 8, "deep_supervision": False},
            "train": {"patch_size": [16, 32, 32], "batch_size": 2, "warmup_steps": 0, "learning_rate": 0.01,
                      "lr_schedule": "constant"},
        }
    )
    every_z = {0: list(range(image.shape[0]))}
    res = napari_sparse3d.run(image, truth, annotated_slices=every_z, spacing=(1, 1, 1), max_iterations=100,
                              config=config, device="cpu", seed=0)
    assert res.model.sparse3d.spacing == (1.0, 1.0, 1.0)
    return res.model


def test_an_image_at_another_spacing_is_segmented_at_the_models(model):
    image, truth = _render((2, 1, 1), seed=1)
    assert image.shape == (24, 48, 48)
    labels = napari_sparse3d.predict(image, model, spacing=(2, 1, 1), device="cpu")
    assert labels.shape == image.shape
    with pytest.warns(UserWarning, match="spacing is unknown"):
        plain = napari_sparse3d.predict(image, model, device="cpu")
    # physical volume (2 units a voxel): the truth's, within 15%, with the spacing; far off without it
    true_volume = 2 * truth.sum()
    assert abs(2 * (labels == 1).sum() / true_volume - 1) < 0.15
    assert 2 * (plain == 1).sum() / true_volume > 1.25
    with_spacing, without = _dice(labels == 1, truth == 1), _dice(plain == 1, truth == 1)
    assert with_spacing > 0.9
    assert with_spacing > without + 0.08


def test_out_zarr_probabilities_and_a_file_buffer_give_the_same_labels(model, tmp_path, monkeypatch):
    image, _ = _render((2, 1, 1), seed=1)
    labels = napari_sparse3d.predict(image, model, spacing=(2, 1, 1), device="cpu")
    written = napari_sparse3d.predict(image, model, spacing=(2, 1, 1), device="cpu", out=tmp_path / "labels.zarr")
    np.testing.assert_array_equal(load_array(tmp_path / "labels.zarr")[...], labels)
    assert written.shape == image.shape
    # model-grid probabilities in a memory-mapped temporary file instead of memory: the same result
    monkeypatch.setattr(resample, "BUFFER_BYTES", 0)
    volume = as_volume(image)
    mapped, probabilities = predict_volume(volume, model, device="cpu", spacing=(2, 1, 1), keep_probabilities=True)
    np.testing.assert_array_equal(mapped, labels)
    assert probabilities.shape == (2, *image.shape)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model.sparse3d.class_values)[probabilities.argmax(0)], labels)


def test_matching_spacing_predicts_as_without_resampling(model):
    image, _ = _render((1, 1, 1), seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known spacing: no warning
        same = napari_sparse3d.predict(image, model, spacing=(1, 1, 1), device="cpu")
        close = napari_sparse3d.predict(image, model, spacing=(1.04, 0.97, 1.0), device="cpu")  # within 5%
    with pytest.warns(UserWarning, match=r"trained at spacing \(1\.0, 1\.0, 1\.0\).*assumed"):
        plain = napari_sparse3d.predict(image, model, device="cpu")
    np.testing.assert_array_equal(same, plain)
    np.testing.assert_array_equal(close, plain)


def test_a_model_without_spacing_never_resamples(small_volume, tiny_config):
    image, labels, _, slices = small_volume
    res = napari_sparse3d.run(image, labels, annotated_slices=slices, max_iterations=2, config=tiny_config, device="cpu")
    assert res.model.sparse3d.spacing is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = napari_sparse3d.predict(image, res.model, device="cpu")
        given = napari_sparse3d.predict(image, res.model, spacing=(3, 1, 1), device="cpu")
    np.testing.assert_array_equal(given, plain)


def test_spacing_is_checked(model):
    image = np.zeros((8, 16, 16), np.float32)
    with pytest.raises(ValueError, match="spacing"):
        napari_sparse3d.predict(image, model, spacing=(0, 1, 1), device="cpu")
    with pytest.raises(TypeError, match="spacing"):
        napari_sparse3d.predict(image, model, spacing="thick", device="cpu")


def test_cli_predict_takes_spacing(model, tmp_path):
    from napari_sparse3d.io.checkpoint import save_checkpoint

    image, truth = _render((2, 1, 1), seed=1)
    np.save(tmp_path / "coarse.npy", image)
    save_checkpoint(model, tmp_path / "model.pt")
    args = ["predict", str(tmp_path / "model.pt"), str(tmp_path / "coarse.npy"), "--device", "cpu", "--quiet",
            "--format", "npy"]
    assert main([*args, "--output-dir", str(tmp_path / "a"), "--spacing", "2", "1", "1"]) == 0
    labels = np.load(tmp_path / "a" / "coarse_labels.npy")
    np.testing.assert_array_equal(labels, napari_sparse3d.predict(image, model, spacing=(2, 1, 1), device="cpu"))
    with pytest.warns(UserWarning, match="spacing is unknown"):
        assert main([*args, "--output-dir", str(tmp_path / "b")]) == 0
    assert _dice(labels == 1, truth == 1) > _dice(np.load(tmp_path / "b" / "coarse_labels.npy") == 1, truth == 1)


@pytest.mark.parametrize("source, target", [((7, 11, 9), (14, 5, 9)), ((10, 8, 6), (3, 17, 6)), ((1, 4, 4), (3, 4, 1))])
def test_resampled_view_is_torch_trilinear_in_any_box(source, target):
    array = np.random.default_rng(0).random((2, *source)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(array)[None], size=target, mode="trilinear", align_corners=False)[0].numpy()
    view = ResampledVolume(as_volume(array, channel_axis=0), target)
    assert view.spatial_shape == target and view.channels == 2
    np.testing.assert_allclose(view.read(), expected, atol=1e-5)
    box = (slice(1, 3), slice(0, target[1]), slice(target[2] - 1, target[2]))
    np.testing.assert_allclose(view.read(box), expected[(slice(None), *box)], atol=1e-5)
    np.testing.assert_allclose(view.read((slice(None, None, 2),) * 3), expected[:, ::2, ::2, ::2], atol=1e-5)


def test_grid_decisions():
    assert grid_shape((24, 48, 48), (2, 1, 1), (1, 1, 1)) == (48, 48, 48)
    assert grid_shape((5, 3, 3), (0.1, 1, 1), (1, 1, 1)) == (1, 3, 3)  # never empty
    assert not spacing_differs((1.04, 1, 0.96), (1, 1, 1))
    assert spacing_differs((1, 1, 1.06), (1, 1, 1))
    assert model_grid((24, 48, 48), None, (1, 1, 1)) is None
    assert model_grid((24, 48, 48), (2, 1, 1), None) is None
    assert model_grid((24, 48, 48), (2, 1, 1), (1, 1, 1)) == (48, 48, 48)
