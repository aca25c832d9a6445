"""bioimage.io export: the package validates and bioimageio.core's model test passes on the CPU (both weight formats)."""

import numpy as np
import pytest

import napari_sparse3d
from napari_sparse3d.cli import main
from napari_sparse3d.config import Config

core = pytest.importorskip("bioimageio.core", reason="the 'bioimageio' extra (bioimageio.spec, bioimageio.core) is not installed")
from bioimageio.spec import load_description  # noqa: E402 - after the skip


def _trained(normalization, spacing=(2.0, 1.0, 1.0)):
    rng = np.random.default_rng(0)
    truth = np.zeros((24, 64, 64), np.uint8)
    truth[6:18, 10:40, 20:50] = 1
    image = (1000 + 500 * truth.astype(np.float32) + rng.normal(0, 100, truth.shape)).astype(np.float32)
    labels = np.zeros_like(truth)
    labels[12] = truth[12] + 1
    labels[:, 30] = truth[:, 30] + 1
    config = Config.from_dict({
        "model": {"levels": 3, "base_features": 4},
        "train": {"patch_size": [8, 32, 32], "batch_size": 2, "warmup_steps": 0, "normalization": normalization},
    })
    res = napari_sparse3d.run(image, labels, max_iterations=3, config=config, spacing=spacing, device="cpu")
    return image, res


@pytest.mark.parametrize("normalization", ["image", "dataset"])
def test_an_exported_package_validates_and_passes_the_model_test(normalization, tmp_path):
    image, res = _trained(normalization)
    checkpoint = res.save(tmp_path / "model.pt")
    np.save(tmp_path / "image.npy", image)
    package = tmp_path / "model.zip"
    assert main(["export", str(checkpoint), str(package), "--image", str(tmp_path / "image.npy"),
                 "--author", "A. Tester"]) == 0
    described = load_description(package)
    assert described.validation_summary.status == "valid-format", described.validation_summary.format()
    assert [w for w in ("pytorch_state_dict", "torchscript") if getattr(described.weights, w) is not None] == [
        "pytorch_state_dict", "torchscript"]
    halo = [a.halo for a in described.outputs[0].axes if hasattr(a, "halo")]
    assert len(halo) == 3 and min(halo) >= 1  # the classifier's margin, for a consumer that tiles
    summary = core.test_model(package, devices=["cpu"])
    assert summary.status == "passed", summary.format()


def test_export_refuses_what_it_cannot_write(tmp_path):
    _, res = _trained("image")
    with pytest.raises(ValueError, match="must end in .zip"):
        napari_sparse3d.export(res.model, tmp_path / "model.tar")
    napari_sparse3d.export(res.model, tmp_path / "model.zip")  # test tensors drawn from the training statistics
    with pytest.raises(ValueError, match="already exists"):
        napari_sparse3d.export(res.model, tmp_path / "model.zip")


def test_a_multichannel_model_exports_with_its_image_and_a_nan_image_is_refused(tmp_path):
    """Before: `export` had no --channel-axis, so a two-channel model could not be given its image; an image
    holding NaN wrote a package whose test output was all NaN."""
    image, single = _trained("image")
    two = np.stack([image, image[:, ::-1]], axis=-1)  # channels last
    truth = np.zeros(image.shape, np.uint8)
    truth[12] = (image[12] > 1250) + 1
    res = napari_sparse3d.run(two, truth, channel_axis=3, max_iterations=2, device="cpu", config=Config.from_dict({
        "model": {"levels": 3, "base_features": 4}, "train": {"patch_size": [8, 32, 32], "batch_size": 2}}))
    checkpoint = res.save(tmp_path / "two.pt")
    np.save(tmp_path / "two.npy", two)
    assert main(["export", str(checkpoint), str(tmp_path / "two.zip"), "--image", str(tmp_path / "two.npy"),
                 "--channel-axis", "-1"]) == 0
    assert load_description(tmp_path / "two.zip").validation_summary.status == "valid-format"
    broken = image.copy()
    broken[image.shape[0] // 2, 32, 32] = np.nan
    with pytest.raises(ValueError, match=r"image: the test crop .* holds NaN or infinite values"):
        napari_sparse3d.export(single.model, tmp_path / "nan.zip", image=broken)
    assert not (tmp_path / "nan.zip").exists()
