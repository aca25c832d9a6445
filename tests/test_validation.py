"""Bad input gets a ValueError or TypeError naming the argument, what was expected and what came."""

import numpy as np
import pytest

import napari_sparse3d

SHAPE = (10, 16, 16)


def _good():
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    labels[5, 2:6, 2:6] = 1
    return image, labels, {0: [5]}


def _with(**changes):
    image, labels, slices = _good()
    kwargs = {"annotated_slices": slices, "max_iterations": 1}
    image = changes.pop("image", image)
    labels = changes.pop("labels", labels)
    kwargs.update(changes)
    return image, labels, kwargs


def _nan_image():
    image = _good()[0]
    image[3, 4, 5] = np.nan
    return image


def _inf_image():
    image = _good()[0]
    image[0, 0, 0] = np.inf
    return image


def _only_foreground():
    labels = np.zeros(SHAPE, np.uint8)
    labels[5, 2:6, 2:6] = 1
    return labels


CASES = {
    "2D image": (dict(image=np.zeros((16, 16), np.float32), labels=np.zeros((16, 16), np.uint8)), ValueError, r"image must be a 3D volume.*got 2D"),
    "4D image without channel axis": (dict(image=np.zeros((2,) + SHAPE, np.float32)), ValueError, r"image is 4D.*channel_axis"),
    "5D image": (dict(image=np.zeros((1, 2) + SHAPE, np.float32)), ValueError, r"image must be a 3D volume.*5D"),
    "shape mismatch": (dict(labels=np.zeros((10, 16, 15), np.uint8)), ValueError, r"labels must have the image's spatial shape \(10, 16, 16\), got \(10, 16, 15\)"),
    "no annotations": (dict(labels=np.zeros(SHAPE, np.uint8), annotated_slices=None), ValueError, r"labels hold no annotations"),
    "one class, no background": (dict(labels=_only_foreground(), annotated_slices=None), ValueError, r"only one class \(label 1\)"),
    "only background": (dict(labels=np.zeros(SHAPE, np.uint8)), ValueError, r"only one class \(background\)"),
    "NaN in image": (dict(image=_nan_image()), ValueError, r"image contains 1 NaN or infinite"),
    "inf in image": (dict(image=_inf_image()), ValueError, r"image contains 1 NaN or infinite"),
    "fractional labels": (dict(labels=np.full(SHAPE, 0.5, np.float32)), ValueError, r"labels contain fractional values"),
    "negative labels": (dict(labels=np.full(SHAPE, -1, np.int16)), ValueError, r"labels contain negative values \(min -1\)"),
    "slice out of range": (dict(annotated_slices={0: [10]}), ValueError, r"annotated_slices\[0\]: index 10 is out of range for axis 0 of size 10"),
    "negative slice": (dict(annotated_slices={1: [-1]}), ValueError, r"annotated_slices\[1\]: index -1 is out of range"),
    "bad slice axis": (dict(annotated_slices={3: [1]}), ValueError, r"annotated_slices: axis must be 0, 1 or 2"),
    "slices not a dict": (dict(annotated_slices=[5]), TypeError, r"annotated_slices must be a dict"),
    "fractional slice index": (dict(annotated_slices={0: [2.5]}), TypeError, r"indices must be integers, got 2.5"),
    "negative seconds": (dict(max_seconds=-1), ValueError, r"max_seconds must be a positive finite number of seconds, got -1"),
    "zero iterations": (dict(max_iterations=0), ValueError, r"max_iterations must be a positive integer, got 0"),
    "fractional iterations": (dict(max_iterations=2.5), TypeError, r"max_iterations must be an integer"),
    "empty image": (dict(image=np.zeros((0, 16, 16), np.float32), labels=np.zeros((0, 16, 16), np.uint8)), ValueError, r"image must not be empty, got shape \(0, 16, 16\)"),
    "object image": (dict(image=np.empty(SHAPE, dtype=object)), TypeError, r"image must have a numeric or boolean dtype, got dtype object"),
    "object labels": (dict(labels=np.empty(SHAPE, dtype=object)), TypeError, r"labels must have a numeric or boolean dtype, got dtype object"),
    "complex image": (dict(image=np.zeros(SHAPE, np.complex64)), TypeError, r"image must have a numeric or boolean dtype"),
    "image not an array": (dict(image={"a": 1}), TypeError, r"image must be an array"),
    "missing image file": (dict(image="/nonexistent/volume.tif"), ValueError, r"image: file '/nonexistent/volume.tif' does not exist"),
    "bad spacing": (dict(spacing=(1.0, 0.0, 1.0)), ValueError, r"spacing must be three positive finite numbers"),
    "spacing wrong length": (dict(spacing=(1.0, 1.0)), ValueError, r"spacing must be three"),
    "bad device": (dict(device="tpu"), ValueError, r"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
    "cuda without cuda": (dict(device="cuda"), ValueError, r"CUDA is not available"),
    "bad seed": (dict(seed=-3), TypeError, r"seed must be an integer in \[0, 2\*\*63\), got -3"),
    "seed beyond int64": (dict(seed=2**64), TypeError, r"seed must be an integer in \[0, 2\*\*63\)"),
    # an explicit patch is padded to its size: 512^3 of a 10x16x16 volume took 24 GB before it was refused
    "patch larger than the volume": (dict(config={"train": {"patch_size": [512, 512, 512]}}), ValueError,
                                     r"config.train.patch_size \(512, 512, 512\) is larger than the volume \(10, 16, 16\)"
                                     r" allows: at most \(\d+, 16, 16\)"),
    "NaN in the config": (dict(config={"train": {"dice_weight": float("nan")}}), ValueError,
                          r"config.train.dice_weight must be a finite number, got nan"),
    "missing image path and no labels": (dict(image="/nonexistent/p.zarr", labels=None), ValueError,
                                         r"image: '/nonexistent/p.zarr' does not exist \(neither a file nor a project"),
    "stop not an event": (dict(stop=True), TypeError, r"stop must be a threading.Event \(or None\), got bool"),
    "bad config type": (dict(config=3), TypeError, r"config must be None, a preset name, a dict or a Config"),
    "bad preset": (dict(config="huge"), ValueError, r"preset must be one of"),
    "channel axis on 3D": (dict(channel_axis=0), ValueError, r"image with a channel_axis must be 4D"),
    "bad background label": (dict(background_label=0), ValueError, r"background_label must be a label value >= 1"),
    "progress not callable": (dict(progress="yes"), TypeError, r"progress must be a callable"),
    # finite float64 values that float32 (the engine's type) cannot hold: not "NaN or infinite"
    "image beyond float32": (dict(image=_good()[0].astype(np.float64) * 1e39), ValueError,
                             r"image has values beyond float32's range \(largest magnitude [\d.]+e\+3[89], float32 holds up to 3.4e\+38\)"),
    "float labels beyond int64": (dict(labels=_good()[1] * 2.0**63), ValueError,
                                  r"labels contain values beyond the integer range \(largest 9\.22337e\+18\)"),
    "negative float labels": (dict(labels=-_good()[1].astype(np.float32)), ValueError, r"labels contain negative values \(min -1\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_rejects_bad_input(case):
    changes, error, message = CASES[case]
    if case == "cuda without cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    image, labels, kwargs = _with(**dict(changes))
    with pytest.raises(error, match=message):
        napari_sparse3d.run(image, labels, **kwargs)


def test_bad_input_leaves_the_callers_arrays_untouched():
    image, labels, _ = _good()
    image_copy, labels_copy = image.copy(), labels.copy()
    with pytest.raises(ValueError):
        napari_sparse3d.run(image, labels, annotated_slices={0: [99]})
    assert np.array_equal(image, image_copy) and np.array_equal(labels, labels_copy)


def test_training_never_modifies_the_callers_image(tiny_config):
    image, labels, slices = _good()
    image_copy = image.copy()
    napari_sparse3d.run(image, labels, annotated_slices=slices, max_iterations=2, config=tiny_config)
    assert np.array_equal(image, image_copy)


@pytest.fixture
def trained(tiny_config):
    image, labels, slices = _good()
    return napari_sparse3d.run(image, labels, annotated_slices=slices, max_iterations=1, config=tiny_config).model


def test_predict_rejects_bad_input(trained, tmp_path):
    image = _good()[0]
    with pytest.raises(TypeError, match=r"model_or_checkpoint must be a model returned by napari_sparse3d.run"):
        import torch

        napari_sparse3d.predict(image, torch.nn.Conv3d(1, 2, 1))
    with pytest.raises(TypeError, match=r"model_or_checkpoint must be a trained model, a checkpoint path"):
        napari_sparse3d.predict(image, 42)
    with pytest.raises(ValueError, match=r"checkpoint: file .* does not exist"):
        napari_sparse3d.predict(image, str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"is not a readable napari-sparse3d checkpoint"):
        napari_sparse3d.predict(image, str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match=r"out must have the image's spatial shape"):
        napari_sparse3d.predict(image, trained, out=np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"out must have an integer dtype"):
        napari_sparse3d.predict(image, trained, out=np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match=r"image has 2 channels, but the model was trained on 1"):
        napari_sparse3d.predict(np.stack([image, image]), trained, channel_axis=0)
    bad = image.copy()
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match=r"image contains 1 NaN"):
        napari_sparse3d.predict(bad, trained)


def test_checkpoint_from_a_newer_version_is_refused(trained, tmp_path):
    import torch

    from napari_sparse3d.io.checkpoint import save_checkpoint

    path = save_checkpoint(trained, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"written by a newer napari-sparse3d"):
        napari_sparse3d.predict(_good()[0], str(path))


def test_new_classes_on_warm_start_are_refused(trained):
    image, labels, slices = _good()
    labels[6, 2:4, 2:4] = 4
    with pytest.raises(ValueError, match=r"labels hold values \[4\] that the model does not know"):
        from napari_sparse3d.engine.annotations import prepare_annotations

        prepare_annotations(labels, SHAPE, slices, class_values=trained.sparse3d.class_values)




