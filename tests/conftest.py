import numpy as np
import pytest

from napari_sparse3d.config import Config


@pytest.fixture
def tiny_config() -> Config:
    """A network small enough to train a few steps in well under a second."""
    return Config.from_dict(
        {
            "model": {"levels": 3, "base_features": 4},
            "train": {"patch_size": [8, 16, 16], "batch_size": 1, "warmup_steps": 0},
            "predict": {"batch_size": 2},
        }
    )


@pytest.fixture
def small_volume():
    """A 20x36x28 volume with two bright boxes, sparse labels on two slices per axis."""
    rng = np.random.default_rng(0)
    truth = np.zeros((20, 36, 28), np.uint8)
    truth[4:12, 6:20, 5:15] = 1
    truth[10:18, 22:32, 14:25] = 2
    image = (truth * 1.0 + rng.normal(0, 0.2, truth.shape)).astype(np.float32)
    slices = {0: [8, 14], 1: [12, 26], 2: [10, 20]}
    labels = np.zeros_like(truth)
    labels[[8, 14]] = truth[[8, 14]]
    labels[:, [12, 26]] = truth[:, [12, 26]]
    labels[:, :, [10, 20]] = truth[:, :, [10, 20]]
    return image, labels, truth, slices


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``(model, path)``: a two-step model on noise with classes 0, 1, 2, saved as a checkpoint."""
    import napari_sparse3d

    config = Config.from_dict(
        {
            # no pixel classifier: its prior would make the two-step model predict smooth regions, and the
            # post-processing tests need a model that predicts fragments
            "model": {"levels": 2, "base_features": 4, "pixel_classifier": False},
            "train": {"patch_size": [8, 16, 16], "batch_size": 1, "warmup_steps": 0},
        }
    )
    image = np.random.default_rng(0).normal(size=(12, 24, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[6, :12] = 1
    labels[6, 12:] = 2
    res = napari_sparse3d.run(image, labels, max_iterations=2, device="cpu", config=config)
    return res.model, res.save(tmp_path_factory.mktemp("model") / "model.pt")
