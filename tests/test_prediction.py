import numpy as np
import pytest
import torch
import zarr

from napari_sparse3d.checkpoint import ModelInfo
from napari_sparse3d.config import Config
from napari_sparse3d.data import as_volume
from napari_sparse3d.model import UNet3D
from napari_sparse3d.prediction import gaussian_importance, predict_blocks, window_starts
from napari_sparse3d.preprocess import Normalization
import napari_sparse3d


def _model(patch=(8, 16, 16), classes=(0, 1, 5), overlap=0.5, precision="fp32"):
    cfg = Config.from_dict(
        {
            "model": {"levels": 3, "base_features": 4},
            "train": {"patch_size": list(patch), "precision": precision},
            "predict": {"overlap": overlap, "batch_size": 3, "mirror_tta": False},  # the plain reference has none
        }
    )
    torch.manual_seed(0)
    model = UNet3D(1, len(classes), cfg.model).eval()
    model.sparse3d = ModelInfo(cfg, list(classes), Normalization((0.0,), (1.0,), (0.5,), (0.3,)), patch, None, 1)
    return model


def _reference(image, model):
    """Whole-volume sliding window, written plainly: one accumulator over the volume."""
    info = model.sparse3d
    patch = info.patch_size
    k = len(info.class_values)
    acc = np.zeros((k,) + image.shape, np.float64)
    wsum = np.zeros(image.shape, np.float64)
    g = gaussian_importance(patch, info.config.predict.gaussian_sigma)
    norm = info.normalization.apply(image[None].astype(np.float32).copy())
    for z in window_starts(image.shape[0], patch[0], info.config.predict.overlap):
        for y in window_starts(image.shape[1], patch[1], info.config.predict.overlap):
            for x in window_starts(image.shape[2], patch[2], info.config.predict.overlap):
                crop = norm[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]]
                shape = crop.shape[1:]
                padded = np.pad(crop, [(0, 0)] + [(0, p - s) for p, s in zip(patch, shape)])
                with torch.inference_mode():
                    p = torch.softmax(model(torch.from_numpy(padded[None])), 1)[0].numpy()
                sl = (slice(z, z + shape[0]), slice(y, y + shape[1]), slice(x, x + shape[2]))
                gl = g[: shape[0], : shape[1], : shape[2]]
                acc[(slice(None),) + sl] += p[:, : shape[0], : shape[1], : shape[2]] * gl
                wsum[sl] += gl
    probs = acc / wsum
    return probs, np.asarray(info.class_values)[probs.argmax(0)]


@pytest.mark.parametrize("shape", [(13, 37, 29), (8, 16, 16), (5, 40, 9)])
def test_streaming_equals_whole_volume_prediction(shape):
    image = np.random.default_rng(1).random(shape).astype(np.float32)
    model = _model()
    probs_ref, labels_ref = _reference(image, model)
    probs = np.full((3,) + shape, np.nan, np.float32)
    labels = np.full(shape, 255, np.uint8)
    covered = np.zeros(shape, np.int32)
    for block in predict_blocks(as_volume(image), model, device="cpu"):
        probs[(slice(None),) + block.region] = block.probabilities
        labels[block.region] = block.labels
        covered[block.region] += 1
    assert (covered == 1).all()  # blocks tile the volume exactly once
    np.testing.assert_allclose(probs, probs_ref, atol=1e-5)
    agree = labels == labels_ref
    # an argmax may flip only where two classes tie to within float rounding
    assert agree.mean() > 0.999
    assert set(np.unique(labels)) <= {0, 1, 5}


def test_window_order_does_not_change_the_result():
    image = np.random.default_rng(2).random((13, 37, 29)).astype(np.float32)
    model = _model()
    a = np.zeros((3, 13, 37, 29), np.float32)
    b = np.zeros_like(a)
    for block in predict_blocks(as_volume(image), model, device="cpu"):
        a[(slice(None),) + block.region] = block.probabilities
    for block in predict_blocks(as_volume(image), model, device="cpu", priority=(12, 36, 28)):
        b[(slice(None),) + block.region] = block.probabilities
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_prediction_into_zarr_matches_numpy(tmp_path):
    image = np.random.default_rng(3).random((13, 37, 29)).astype(np.float32)
    model = _model()
    in_memory = napari_sparse3d.predict(image, model, device="cpu")
    out = zarr.create_array(str(tmp_path / "labels.zarr"), shape=image.shape, dtype="uint8", chunks=(8, 16, 16))
    returned = napari_sparse3d.predict(image, model, out=out, device="cpu")
    assert returned is out
    np.testing.assert_array_equal(out[...], in_memory)
    reopened = zarr.open_array(str(tmp_path / "labels.zarr"), mode="r")
    np.testing.assert_array_equal(reopened[...], in_memory)


def test_zarr_image_is_read_lazily(tmp_path):
    image = np.random.default_rng(4).random((13, 37, 29)).astype(np.float32)
    z = zarr.create_array(str(tmp_path / "image.zarr"), shape=image.shape, dtype="float32", chunks=(8, 16, 16))
    z[...] = image
    model = _model()
    from_zarr = napari_sparse3d.predict(str(tmp_path / "image.zarr"), model, device="cpu")
    np.testing.assert_array_equal(from_zarr, napari_sparse3d.predict(image, model, device="cpu"))


def test_progress_reports_every_window():
    reports = []
    image = np.zeros((13, 37, 29), np.float32)
    list(predict_blocks(as_volume(image), _model(), device="cpu", progress=reports.append))
    assert reports[-1].windows_done == reports[-1].windows_total and reports[-1].progress == 1.0


def test_mirror_tta_is_a_valid_distribution():
    image = np.random.default_rng(5).random((8, 16, 16)).astype(np.float32)
    model = _model()
    cfg = model.sparse3d.config.predict.__class__(mirror_tta=True, overlap=0.5)
    (block,) = list(predict_blocks(as_volume(image), model, device="cpu", config=cfg))
    np.testing.assert_allclose(block.probabilities.sum(0), 1.0, atol=1e-5)


def test_window_starts_cover_the_axis():
    for size, window in [(100, 32), (32, 32), (10, 32), (33, 32)]:
        starts = window_starts(size, window, 0.5)
        assert starts[0] == 0 and starts[-1] + window >= size
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + window] = True
        assert covered.all()
