"""``napari-sparse3d predict`` with post-processing: --min-size, --keep-largest, --instances OUT."""

import numpy as np
import pytest
import zarr
from scipy import ndimage

from napari_sparse3d.cli import main
from napari_sparse3d.engine.postprocess import clean_labels, instances_from_prediction
from napari_sparse3d.io.arrays import load_array


@pytest.fixture
def setup(tiny_checkpoint, tmp_path):
    """``(model path, image path, the raw prediction)``: a model of classes 0, 1, 2 that predicts many fragments."""
    model, model_path = tiny_checkpoint
    np.save(tmp_path / "image.npy", np.random.default_rng(1).normal(size=(12, 24, 24)).astype(np.float32))
    assert main(["predict", str(model_path), str(tmp_path / "image.npy"), "-o", str(tmp_path / "raw"), "--format", "npy",
                 "--device", "cpu", "--quiet"]) == 0
    raw = np.load(tmp_path / "raw" / "image_labels.npy")
    sizes = np.bincount(ndimage.label(raw == 1)[0].ravel())[1:]
    assert (sizes < 10).any() and (sizes >= 10).any()  # the premise: fragments to remove, objects to keep
    return model_path, tmp_path / "image.npy", raw


def test_predict_writes_cleaned_labels_and_an_instance_array(setup, tmp_path, capsys):
    model_path, image, raw = setup
    out = tmp_path / "out"
    assert main(["predict", str(model_path), str(image), "-o", str(out), "--format", "zarr", "--instances",
                 str(tmp_path / "out.zarr"), "--min-size", "10", "--device", "cpu", "--quiet"]) == 0
    labels = load_array(out / "image_labels.zarr")[...]
    np.testing.assert_array_equal(labels, clean_labels(raw, min_size=10))
    for value in (1, 2):
        sizes = np.bincount(ndimage.label(labels == value)[0].ravel())[1:]
        assert sizes.size and sizes.min() >= 10
    instances = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")[...]
    assert instances.dtype == np.uint32 and instances.shape == raw.shape and instances.max() >= 1
    # the boundary class 2 of the model is used by default ("auto")
    np.testing.assert_array_equal(instances, instances_from_prediction(labels, interior=1, boundary=2, min_size=10))
    assert np.bincount(instances.ravel())[1:].min() >= 10
    assert set(np.unique(labels[instances > 0]).tolist()) <= {1, 2}
    assert f"{instances.max()} instances -> {tmp_path / 'out.zarr'}" in capsys.readouterr().out


def test_keep_largest_and_boundary_none(setup, tmp_path):
    model_path, image, raw = setup
    assert main(["predict", str(model_path), str(image), "-o", str(tmp_path / "big"), "--format", "npy", "--keep-largest",
                 "--instances", str(tmp_path / "i.npy"), "--boundary", "none", "--device", "cpu", "--quiet"]) == 0
    labels = np.load(tmp_path / "big" / "image_labels.npy")
    assert ndimage.label(labels == 1)[1] == 1 and ndimage.label(labels == 2)[1] == 1
    np.testing.assert_array_equal(labels, clean_labels(raw, keep_largest=(1, 2)))
    np.testing.assert_array_equal(np.load(tmp_path / "i.npy"), instances_from_prediction(labels, interior=1))


def test_bad_postprocessing_options_are_refused_before_predicting(setup, tmp_path, capsys):
    model_path, image, _ = setup
    one = [str(model_path), str(image), "-o", str(tmp_path / "o"), "--quiet"]
    instances = ["--instances", str(tmp_path / "i.tif")]
    cases = [
        ([*one, "--min-size", "-1"], "--min-size must be >= 0, got -1"),
        ([*one, *instances, "--boundary", "edge"], "--boundary must be a class value, 'none' or 'auto'"),
        ([*one, *instances, "--interior", "5"], "--interior 5 and --boundary 2 must be classes of the model: [1, 2]"),
        ([*one, "--instances", str(tmp_path / "o" / "image_labels.tif")], "OUT apart from the labels' outputs"),
        ([str(model_path), str(image), str(image), "-o", str(tmp_path / "o"), *instances], "give one image"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "i.tif").exists()
    # an existing instance file is not replaced without --overwrite
    (tmp_path / "i.npy").write_bytes(b"mine")
    with pytest.raises(SystemExit):
        main(["predict", *one, "--instances", str(tmp_path / "i.npy")])
    assert "already exists" in capsys.readouterr().err and (tmp_path / "i.npy").read_bytes() == b"mine"
