"""Prediction reads the classifier's probabilities that training already holds (``prior_map``).

Computing them is most of a default prediction's time on the CPU; the trainer
keeps them for its samplers, so previews, the prediction after training and
``run`` read them instead.
"""

import numpy as np
import pytest

import napari_sparse3d
from napari_sparse3d.config import Config
from napari_sparse3d.engine import prediction
from napari_sparse3d.engine.prediction import predict_region, predict_volume
from napari_sparse3d.engine.training import Trainer
from napari_sparse3d.engine.volume import as_volume


def _config(precision="fp32"):
    return Config.from_dict({
        "model": {"levels": 2, "base_features": 4},
        "train": {"patch_size": [8, 16, 16], "batch_size": 2, "warmup_steps": 0, "precision": precision},
        "predict": {"mirror_tta": False, "tile_voxels": 4000},  # several tiles: each reads its part of the map
    })


@pytest.fixture(params=["fp32", "bf16"])
def trained(small_volume, request):
    """In bfloat16 the trainer's map and the prediction both run the classifier's products in bfloat16."""
    image, labels, _, slices = small_volume
    trainer = Trainer.from_inputs(image, labels, slices, config=_config(request.param), device="cpu", seed=0)
    for _ in trainer.steps(max_iterations=3):
        pass
    return image, trainer


def _refuse_to_compute(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the classifier's probabilities were computed again")

    monkeypatch.setattr(prediction, "prior", refuse)


def test_the_trainers_map_gives_the_computed_prediction_without_computing_it(trained, monkeypatch):
    image, trainer = trained
    model, volume = trainer.snapshot(), as_volume(image)
    labels, probs = predict_volume(volume, model, device="cpu", keep_probabilities=True)
    prior_map = trainer.data.prior_map(0)
    assert prior_map.dtype == np.float16 and prior_map.shape == (3, *image.shape)
    _refuse_to_compute(monkeypatch)
    given, given_probs = predict_volume(volume, model, device="cpu", keep_probabilities=True, prior_map=prior_map)
    np.testing.assert_allclose(given_probs, probs, atol=2e-3)  # the map is float16, the computed one float32
    assert (given == labels).mean() > 0.999
    # and it is the map that is read: one that says "background" everywhere turns the prediction to it
    background = np.zeros_like(prior_map)
    background[0] = 1
    other, _ = predict_volume(volume, model, device="cpu", prior_map=background)
    assert (other == 0).mean() > (labels == 0).mean() + 0.05


def test_a_region_reads_its_crop_of_the_map(trained, monkeypatch):
    image, trainer = trained
    model, volume = trainer.snapshot(), as_volume(image)
    region = (slice(None), slice(12, 13), slice(None))
    computed = list(predict_region(volume, model, region, device="cpu"))
    _refuse_to_compute(monkeypatch)
    given = list(predict_region(volume, model, region, device="cpu", prior_map=trainer.data.prior_map(0)))
    assert [b.region for b in given] == [b.region for b in computed]
    for a, b in zip(given, computed):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=2e-3)


def test_a_map_that_does_not_fit_is_refused_with_a_clear_error(trained, tiny_checkpoint):
    image, trainer = trained
    model, volume = trainer.snapshot(), as_volume(image)
    prior_map = trainer.data.prior_map(0)
    with pytest.raises(ValueError, match=r"prior_map must have shape \(classes, z, y, x\) = \(3, 20, 36, 28\), got \(3, 20, 36, 27\)"):
        predict_volume(volume, model, device="cpu", prior_map=prior_map[..., :-1])
    with pytest.raises(ValueError, match=r"prior_map must have shape .* got \(2, 20, 36, 28\)"):
        predict_volume(volume, model, device="cpu", prior_map=prior_map[1:])
    with pytest.raises(TypeError, match="prior_map must hold floating-point probabilities, got dtype int64"):
        predict_volume(volume, model, device="cpu", prior_map=np.ones(prior_map.shape, np.int64))
    plain, _ = tiny_checkpoint  # a network without a pixel classifier
    noise = as_volume(np.zeros((12, 24, 24), np.float32))
    with pytest.raises(ValueError, match="prior_map: the model has no pixel classifier"):
        predict_volume(noise, plain, device="cpu", prior_map=np.ones((3, 12, 24, 24), np.float32))


def test_run_predicts_with_the_map_training_computed(small_volume, monkeypatch):
    image, labels, _, slices = small_volume
    _refuse_to_compute(monkeypatch)
    res = napari_sparse3d.run(image, labels, annotated_slices=slices, max_iterations=2, device="cpu", config=_config())
    monkeypatch.undo()
    again, _ = predict_volume(as_volume(image), res.model, device="cpu")
    assert (np.asarray(res.labels) == again).mean() > 0.999


def test_run_on_two_volumes_one_resampled_reads_each_map_on_the_models_grid(small_volume, monkeypatch):
    image, labels, _, slices = small_volume
    coarse, coarse_labels = image[::2], labels[::2]  # half the slices: twice the z spacing
    coarse_slices = {1: slices[1], 2: slices[2]}
    _refuse_to_compute(monkeypatch)
    results = napari_sparse3d.run(
        [image, coarse], [labels, coarse_labels], annotated_slices=[slices, coarse_slices],
        spacing=[(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)], max_iterations=2, device="cpu", config=_config(),
    )
    assert [np.asarray(r.labels).shape for r in results] == [image.shape, coarse.shape]
    monkeypatch.undo()
    again, _ = predict_volume(as_volume(coarse), results[1].model, device="cpu", spacing=(2.0, 1.0, 1.0))
    assert (np.asarray(results[1].labels) == again).mean() > 0.99


def test_the_training_job_previews_and_predicts_from_the_map(small_volume, monkeypatch):
    from napari_sparse3d.engine.prediction import Block
    from napari_sparse3d.loop.jobs import Preview, training_job

    image, labels, _, slices = small_volume
    trainer = Trainer.from_inputs(image, labels, slices, config=_config(), device="cpu", seed=0)
    _refuse_to_compute(monkeypatch)
    region = (slice(None), slice(9, 10), slice(None))
    items = list(training_job(trainer, max_iterations=3, view=lambda: region, preview_every=0.0))
    assert any(isinstance(i, Preview) for i in items)
    painted = np.zeros(image.shape, bool)
    for block in (i for i in items if isinstance(i, Block)):
        painted[block.region] = True
    assert painted.all()
